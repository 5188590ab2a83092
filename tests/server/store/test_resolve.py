"""resolve_model: alias -> pulled folder, folder -> itself, .gguf -> cached conversion, else hub id."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from specserve.kernels.cache import default_cache_dir
from specserve.server.store import pull as pull_module
from specserve.server.store import resolve as resolve_module
from specserve.server.store.errors import StoreError
from specserve.server.store.layout import gguf_dir
from specserve.server.store.parts import sha256_file
from specserve.server.store.resolve import hub_error_message, resolve_model


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SPECSERVE_CACHE": "/srv/models", "XDG_CACHE_HOME": "/xdg"}, Path("/srv/models")),
        ({"XDG_CACHE_HOME": "/xdg"}, Path("/xdg/specserve")),
        ({"SPECSERVE_CACHE": ""}, Path.home() / ".cache" / "specserve"),
        ({"SPECSERVE_CACHE": "~/store"}, Path.home() / "store"),
    ],
)
def test_default_cache_dir(env: dict[str, str], expected: Path) -> None:
    assert default_cache_dir(env) == expected


def test_alias_resolves_to_the_pulled_folder(smollm2_dir: Path, store_cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(pull_module, "convert_gguf", lambda *a, **k: pytest.fail("reconverted"))
    assert resolve_model("smollm2-135m", store_cache) == smollm2_dir


def test_alias_pulls_on_first_use_with_a_log_line(tmp_path: Path, monkeypatch, caplog) -> None:
    pulled = []

    def fake_pull(alias: str, cache: Path, progress: bool) -> Path:
        pulled.append(alias)
        return cache / alias

    monkeypatch.setattr(resolve_module, "pull", fake_pull)
    with caplog.at_level(logging.INFO, logger=resolve_module.__name__):
        assert resolve_model("qwen2.5-coder-0.5b", tmp_path) == tmp_path / "qwen2.5-coder-0.5b"
    assert pulled == ["qwen2.5-coder-0.5b"] and "pulling it (first use)" in caplog.text


def test_local_folder_resolves_to_itself(smollm2_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(smollm2_dir), tmp_path) == smollm2_dir
    with pytest.raises(StoreError, match="no config.json"):
        resolve_model(str(tmp_path), tmp_path)


def test_gguf_file_is_converted_once_keyed_by_content(tmp_path: Path, monkeypatch) -> None:
    converted = []

    def fake_convert(gguf_path: Path, dest: Path, dtype: str, progress: bool) -> None:
        converted.append((gguf_path.name, dtype))
        dest.mkdir()
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(pull_module, "convert_gguf", fake_convert)
    first = tmp_path / "model.gguf"
    first.write_bytes(b"GGUF not really")
    cache = tmp_path / "cache"
    folder = resolve_model(str(first), cache, progress=False)
    assert folder == gguf_dir(cache, sha256_file(first, progress=False), "float32")
    renamed = first.rename(tmp_path / "renamed.GGUF")
    assert resolve_model(str(renamed), cache, progress=False) == folder
    assert resolve_model(str(renamed), cache, gguf_dtype="bfloat16", progress=False) != folder
    assert converted == [("model.gguf", "float32"), ("renamed.GGUF", "bfloat16")]


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_anything_else_is_a_hub_id(spec: str, tmp_path: Path) -> None:
    assert resolve_model(spec, tmp_path) == spec


@pytest.mark.parametrize("spec", ["./missing-model", "/no/such/folder", "~/no-such-xyz", "missing.gguf"])
def test_missing_paths_are_errors_not_hub_ids(spec: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such file or folder"):
        resolve_model(spec, tmp_path)


def test_other_files_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(StoreError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"), tmp_path)


def test_hub_error_message_explains_every_option() -> None:
    exc = OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")
    message = hub_error_message("org/model", exc)
    for expected in ("'org/model'", "not a store alias", "specserve models list", "smollm2-135m",
                     "not a local folder or .gguf file", "hub is unreachable", "OSError: We couldn't connect"):
        assert expected in message
    assert "\n" not in message
