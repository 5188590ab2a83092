"""The benchmark scripts are not a package: they import their siblings (`prompts`, `plots`,
`step_timing`) as top-level modules, so the tests import them with `benchmarks/` on `sys.path`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def benchmark_script():
    """`benchmark_script("offline")` imports `benchmarks/offline.py`."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))
