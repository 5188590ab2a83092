"""Joining parts: byte order, per-part and whole-file sha256 checks, early size check."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from specserve.server.store.errors import IntegrityError
from specserve.server.store.parts import join_parts, sha256_file
from specserve.server.store.wheels import PartFile


def _part(tmp_path: Path, name: str, data: bytes, recorded: bytes | None = None) -> PartFile:
    path = tmp_path / name
    path.write_bytes(data)
    digest = hashlib.sha256(data if recorded is None else recorded).hexdigest()
    return PartFile(path=path, origin=f"{name}==1.0", sha256=digest)


def test_join_concatenates_in_order(tmp_path: Path) -> None:
    parts = [_part(tmp_path, "a", b"GGUF"), _part(tmp_path, "b", b"-body")]
    dest = tmp_path / "joined.gguf"
    join_parts(parts, dest, hashlib.sha256(b"GGUF-body").hexdigest(), 9, progress=False)
    assert dest.read_bytes() == b"GGUF-body"
    assert sha256_file(dest, progress=False) == hashlib.sha256(b"GGUF-body").hexdigest()


def test_corrupt_part_is_named_with_both_hashes(tmp_path: Path) -> None:
    bad = _part(tmp_path, "b", b"-bXdy", recorded=b"-body")
    parts = [_part(tmp_path, "a", b"GGUF"), bad]
    with pytest.raises(IntegrityError) as info:
        join_parts(parts, tmp_path / "j.gguf", hashlib.sha256(b"GGUF-body").hexdigest(), 9, progress=False)
    message = str(info.value)
    assert str(bad.path) in message and bad.sha256 in message
    assert hashlib.sha256(b"-bXdy").hexdigest() in message and "b==1.0" in message


def test_whole_file_hash_is_checked_when_parts_have_none(tmp_path: Path) -> None:
    part = PartFile(path=_part(tmp_path, "a", b"GGUF-body").path, origin="a==1.0", sha256=None)
    expected = "0" * 64
    with pytest.raises(IntegrityError, match=f"expected {expected}") as info:
        join_parts([part], tmp_path / "j.gguf", expected, 9, progress=False)
    assert hashlib.sha256(b"GGUF-body").hexdigest() in str(info.value)


def test_size_mismatch_fails_before_reading(tmp_path: Path) -> None:
    parts = [_part(tmp_path, "a", b"GGUF")]
    with pytest.raises(IntegrityError, match="add up to 4 bytes, expected 9"):
        join_parts(parts, tmp_path / "j.gguf", "0" * 64, 9, progress=False)
    assert not (tmp_path / "j.gguf").exists()
