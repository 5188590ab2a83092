"""The folders are the dependency order: kernels <- drafting <- engine <- {http, training, cli}, with
the model store, which the engine loads through, knowing nothing of the engine (of kernels only where
the cache lives, which the kernel build shares). Every import of every module (function-level
imports included) is checked, so a layer that reaches up fails here before it reaches a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> the layers its modules may import (itself included)
ALLOWED = {
    "kernels": {"kernels"},
    "drafting": {"kernels", "drafting"},
    "server.store": {"kernels", "server.store"},
    "server.engine": {"kernels", "drafting", "server.store", "server.engine"},
    "server.http": {"server.engine", "server.http"},
    "server.bench": {"server.bench"},  # a client of any OpenAI-compatible server: nothing of the engine
    "server.ray": {"server.engine", "server.http", "server.ray"},  # Ray Serve replicas of the HTTP app
    "server.training": {"kernels", "drafting", "server.store", "server.engine", "server.training"},
    "server": {"server"},  # the package's own __init__
    "server.cli": {"kernels", "drafting", "server.store", "server.engine", "server.http", "server.training",
                   "server.bench", "server.ray"},
}


def layer_of(module: str) -> str:
    """'server.engine.step' -> 'server.engine'; 'drafting.eagle' -> 'drafting'; '' -> '' (the root)."""
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The specserve modules a file imports, as names under `specserve.` ('' for the root package)."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("specserve"):
            found.add(node.module.removeprefix("specserve").lstrip("."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("specserve").lstrip(".") for a in node.names
                      if a.name.split(".")[0] == "specserve"}
    return found


def package_files() -> list[Path]:
    return sorted(p for top in ("kernels", "drafting", "server") for p in (ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_import_only_their_own_layer_and_those_below(path):
    layer = layer_of(module_name(path))
    assert layer in ALLOWED, f"{path}: not in any layer; add its folder to ALLOWED"
    upward = {m for m in imported_modules(path) if m and layer_of(m) not in ALLOWED[layer]}
    assert not upward, f"{layer} must not import {sorted(upward)}"


def test_the_checker_sees_relative_absolute_and_function_level_imports(tmp_path, monkeypatch):
    fake = ROOT / "drafting" / "eagle.py"  # parsed from a stand-in text, so its position is what counts
    text = ("from ..server.engine import Engine\nimport specserve.server.http.app\n"
            "def f():\n    from ..kernels.tree import DraftTree\n")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text)
    found = imported_modules(fake)
    assert found == {"server.engine", "server.http.app", "kernels.tree"}
    assert {layer_of(m) for m in found} - ALLOWED["drafting"] == {"server.engine", "server.http"}
