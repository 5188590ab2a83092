"""The manifest that marks a store folder as finished.

It is the last file written into a staged folder before the folder is renamed into place, so a
folder without a manifest (or with one that disagrees with the files beside it) was never finished.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST_NAME = "specserve-manifest.json"
_FORMAT = 1  # bump when the layout of converted folders changes, so old folders are rebuilt


@dataclass(frozen=True)
class Manifest:
    """What a finished folder was built from, and the files (with sizes) it must contain."""

    name: str  # store alias, or the .gguf file name for converted local files
    source: str  # identity of the input: "sha256:<hex>" of a GGUF, or an assembler recipe
    dtype: str
    files: tuple[tuple[str, int], ...]  # (path relative to the folder, size in bytes)
    transformers_version: str
    format: int = _FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def build_manifest(folder: Path, name: str, source: str, dtype: str, transformers_version: str) -> Manifest:
    """A manifest listing every file currently in `folder` (recursively)."""
    files = tuple(
        (path.relative_to(folder).as_posix(), path.stat().st_size)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    )
    return Manifest(name, source, dtype, files, transformers_version)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write the manifest and flush it to disk, so the rename that follows never exposes an empty one."""
    with open(folder / MANIFEST_NAME, "w", encoding="utf-8") as out:
        json.dump(asdict(manifest), out, indent=2)
        out.flush()
        os.fsync(out.fileno())


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, or None if it is missing, unreadable or from another format."""
    try:
        raw = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        manifest = Manifest(**{**raw, "files": tuple((str(p), int(s)) for p, s in raw["files"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return manifest if manifest.format == _FORMAT else None


def is_complete(folder: Path, source: str) -> bool:
    """True if `folder` was finished from `source` and still holds every listed file at its size.

    Sizes, not hashes: this runs on every pull and resolve, and re-hashing gigabytes there would make
    the "already pulled" path slow. Integrity was checked when the folder was built.
    """
    manifest = read_manifest(folder)
    if manifest is None or manifest.source != source:
        return False
    for rel, size in manifest.files:
        try:
            if (folder / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True
