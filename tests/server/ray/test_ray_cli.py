"""`specserve ray-serve` as a user runs it: a model that cannot load ends the command with one
error line naming the reason (not a hang, not Ray's generic deploy failure), and leaves no Ray
process behind. Slow: it starts its own local Ray (~10 s)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

pytest.importorskip("ray.serve", reason="the Ray tests need the `ray` extra: pip install -e '.[ray]'")

pytestmark = pytest.mark.slow
RAY_DAEMONS = {"raylet", "gcs_server"}


def test_a_model_that_cannot_load_ends_the_command_with_one_error(tmp_path):
    not_a_model = tmp_path / "empty-folder"
    not_a_model.mkdir()
    started = time.time()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-c", "import sys; from specserve.server.cli import main; sys.exit(main())",
               "ray-serve", "--model", str(not_a_model), "--draft", "none", "--replicas", "2",
               "--num-cpus-per-replica", "0.5", "--host", "127.0.0.1", "--port", str(port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("specserve: error:")]
    assert errors == [f"specserve: error: the model failed to load: StoreError: {not_a_model} is a folder but not "
                      "a Hugging Face model folder (no config.json)"], result.stderr[-2000:]
    left = [p.info["name"] for p in psutil.process_iter(["name", "create_time"])
            if p.info["name"] in RAY_DAEMONS and p.info["create_time"] >= started]
    assert not left, f"left running: {left}"
