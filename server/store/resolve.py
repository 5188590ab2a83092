"""Turn a `--model` argument into something `from_pretrained` can load.

Accepted, in this order: a store alias (pulled on first use), a local HF folder, a local `.gguf`
file (converted once, cached by content) and, failing those, a hub id returned as is. The hub is not
reachable everywhere; `hub_error_message` explains a failed hub load without a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ...kernels.cache import default_cache_dir
from .errors import StoreError
from .pull import is_pulled, pull, pull_gguf
from .registry import CATALOGUE

log = logging.getLogger(__name__)

# Prefixes that only a filesystem path has: such a spec that does not exist is a typo, not a hub id.
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\")


def resolve_model(
    spec: str,
    cache_dir: Path | None = None,
    *,
    gguf_dtype: str = "float32",
    progress: bool = True,
) -> Path | str:
    """The HF folder (a `Path`) for `spec`, or `spec` itself (a `str`) when it can only be a hub id.

    `cache_dir=None` uses `default_cache_dir()`. `gguf_dtype` is the dtype a local .gguf file is
    converted to. Raises `StoreError` for a path that does not exist or is not loadable.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec in CATALOGUE:
        if not is_pulled(spec, cache):
            log.info("model %s is not in the store at %s yet: pulling it (first use)", spec, cache)
        return pull(spec, cache, progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StoreError(f"{spec} is a folder but not a Hugging Face model folder (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise StoreError(f"{spec} is a file but not a .gguf file; give a .gguf file or an HF folder")
        return pull_gguf(path, cache, gguf_dtype, progress)
    if spec.startswith(_PATH_PREFIXES) or spec.lower().endswith(".gguf"):
        raise StoreError(f"no such file or folder: {spec}")
    return spec


def hub_error_message(spec: str, exc: BaseException) -> str:
    """The message to show when loading the hub id `spec` failed with `exc` (for the CLI edge)."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    aliases = ", ".join(CATALOGUE)
    return (
        f"cannot load model {spec!r}: it is not a store alias (specserve models list: {aliases}), "
        f"not a local folder or .gguf file, and the hub is unreachable: {type(exc).__name__}: {first_line}"
    )
