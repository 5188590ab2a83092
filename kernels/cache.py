"""Where specserve keeps what it makes once per machine: the model store's pulled and converted
models (`server/store`) and built kernels (`cpu_attention`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CACHE_ENV = "SPECSERVE_CACHE"


def default_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """$SPECSERVE_CACHE, else $XDG_CACHE_HOME/specserve, else ~/.cache/specserve.

    Reads the environment when called, never at import time.
    """
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "specserve"
    return Path.home() / ".cache" / "specserve"
