"""Opt-in wall-clock timing of the engine's phases (`EngineConfig.profile`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from .metrics import SpecMetrics


class Stopwatch:
    """`with stopwatch.adds_to(metrics, "verify_seconds"):` adds the block's wall time to that field of
    `metrics` (one `SpecMetrics`, or a list: every sequence of a batch waited for the whole block).
    Disabled, it returns a context that does nothing, so unprofiled steps pay no timing cost.

    CUDA kernels run asynchronously: the clock is read only after the device has finished its queued
    work, or a block's GPU time would be billed to whichever later block first waits for the device."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device

    def adds_to(self, metrics: SpecMetrics | list[SpecMetrics], field: str) -> contextlib.AbstractContextManager:
        return self._timed(metrics, field) if self.enabled else contextlib.nullcontext()

    @contextlib.contextmanager
    def _timed(self, metrics: SpecMetrics | list[SpecMetrics], field: str) -> Iterator[None]:
        start = self._now()
        yield
        elapsed = self._now() - start
        for m in metrics if isinstance(metrics, list) else [metrics]:
            setattr(m, field, getattr(m, field) + elapsed)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
