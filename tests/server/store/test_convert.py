"""convert_gguf's errors (the successful path is the session's SmolLM2 pull, see test_pull.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from specserve.server.store.convert import check_tokenizer, convert_gguf
from specserve.server.store.errors import ConversionError, IntegrityError
from specserve.server.store.registry import CATALOGUE


def test_a_file_that_is_not_gguf_is_a_conversion_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file" * 8)
    with pytest.raises(ConversionError, match=f"cannot convert {bogus}"):
        convert_gguf(bogus, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out", dtype="int4")


def test_tokenizer_pin(smollm2_dir: Path) -> None:
    check_tokenizer(smollm2_dir / "tokenizer.json", CATALOGUE["smollm2-135m"].tokenizer_sha256)
    with pytest.raises(IntegrityError, match="the store pins 0{64}") as info:
        check_tokenizer(smollm2_dir / "tokenizer.json", "0" * 64)
    assert CATALOGUE["smollm2-135m"].tokenizer_sha256 in str(info.value)
