"""A request's heavy preparation (decoding images, the chat template, tokenizing) runs in a small
thread pool: off the event loop, which keeps answering, and off the engine's worker, which keeps
stepping other sequences. The tokenizer (HF fast, Rust) and PIL release the GIL while they work,
so a large prompt costs its own request time, not everyone's. How much work reaches the pool is
bounded before it is queued: by admission (a 429 first) and by the limits on text and images.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class PreparePool:
    """`await pool.run(fn, *args)`: `fn(*args)` on one of `workers` threads."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="specserve-prepare")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        job = self._pool.submit(fn, *args)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # The client left. A queued job is dropped; a running one cannot be interrupted, so the
            # request (and its admission hold) lasts until the job ends: abandoned work still counts.
            if not job.cancel():
                await asyncio.wait([asyncio.wrap_future(job)])
            raise

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
