"""Where the store keeps things, and how a folder gets there all at once or not at all.

Cache layout (`cache_dir` defaults to ~/.cache/specserve, see `kernels.cache.default_cache_dir`)::

    <cache_dir>/models/<alias>/                 finished HF folder of a catalogue model
    <cache_dir>/gguf/<sha256>-<dtype>/          HF folder converted from a local .gguf file
    <cache_dir>/<kind>/.<name>.lock             held while a folder is built (one builder at a time)
    <cache_dir>/<kind>/.<name>.tmp-XXXX/        staging directory of a build in progress

Every finished folder ends with `specserve-manifest.json` (see `manifest.py`).
"""

from __future__ import annotations

import fcntl
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

from .manifest import build_manifest, is_complete, write_manifest


def model_dir(cache_dir: Path, alias: str) -> Path:
    """Folder of the catalogue model `alias`."""
    return Path(cache_dir) / "models" / alias


def gguf_dir(cache_dir: Path, sha256: str, dtype: str) -> Path:
    """Folder of a local .gguf file converted to `dtype`, keyed by the file's content, not its name."""
    return Path(cache_dir) / "gguf" / f"{sha256}-{dtype}"


def build_once(target: Path, name: str, source: str, dtype: str, build: Callable[[Path, Path], None]) -> Path:
    """Make `target` a finished folder built from `source`, unless it already is one; returns `target`.

    `build(work, out)` gets a private scratch directory `work` and must fill the folder `out` (inside
    `work`). Only after it returns is the manifest written into `out` and `out` renamed to `target`;
    if it raises, the staging directory is removed and `target` is left as it was.
    """
    if is_complete(target, source):
        return target
    with _locked(target):
        # Another process may have finished the same folder while we waited for the lock.
        if is_complete(target, source):
            return target
        _remove_stale(target)
        with _staging(target) as work:
            out = work / "out"
            build(work, out)
            _make_readable(out)
            manifest = build_manifest(out, name, source, dtype, version("transformers"))
            write_manifest(out, manifest)
            _replace(out, target)
    return target


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold an exclusive lock for `target`: two processes must not convert the same model at once
    (the 1.5B conversion alone takes gigabytes of RAM)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A scratch directory beside `target` (same filesystem, so the final rename is atomic)."""
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_stale(target: Path) -> None:
    """Remove leftovers of builds that died without cleaning up (killed, out of memory).

    Safe only under the lock: then no other process is using them.
    """
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """Give everyone read access, as for any other cache file: safetensors writes its files 0600,
    which would hide a shared cache's weights from other users."""
    for path in folder.rglob("*"):
        extra = stat.S_IRGRP | stat.S_IROTH | (stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0)
        path.chmod(path.stat().st_mode | extra)


def _replace(folder: Path, target: Path) -> None:
    """Rename `folder` to `target`; an unfinished or outdated `target` is moved aside first."""
    if target.exists():
        # rename() cannot replace a non-empty directory, so move the old one out of the way first.
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(aside / "old")
        folder.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        folder.rename(target)
