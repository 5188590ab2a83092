"""The Triton acceptance kernels, checked against torch in a fresh process under TRITON_INTERPRET=1.

The cases live in `triton_cases.py`; its docstring says why they need a process of their own.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_cases.py")


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (optional: pip install 'specserve[triton]'); acceptance uses torch",
)
def test_triton_kernels_match_torch_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(command, env=env, cwd=CASES.parents[2], capture_output=True, text=True, timeout=900)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, report
