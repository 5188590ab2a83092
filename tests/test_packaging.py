"""The wheel must carry every package folder: pyproject lists them by hand (the repository root is
mapped to `specserve`, which setuptools' automatic discovery cannot express)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"specserve"}
    for top in ("kernels", "drafting", "server"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(("specserve",) + init.parent.relative_to(ROOT).parts))
    assert found == listed
