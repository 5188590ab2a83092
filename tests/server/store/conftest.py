"""Model-store fixtures: one real SmolLM2 pull per test session, into a throwaway cache.

`smollm2_dir` is usable by any test that needs a real converted model (to share it beyond this
folder, move the two fixtures into tests/conftest.py unchanged).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from specserve.server.store.pull import pull


@pytest.fixture(scope="session")
def store_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model-store cache directory shared by the session (never the user's ~/.cache)."""
    return tmp_path_factory.mktemp("store-cache")


@pytest.fixture(scope="session")
def smollm2_dir(store_cache: Path) -> Path:
    """SmolLM2-135M-Instruct pulled and converted (fp32) into `store_cache`, once per session."""
    return pull("smollm2-135m", store_cache, progress=False)
