"""What the scheduler hands to the HTTP layer and to the metrics adapter: the events of a request's
sequences (on one asyncio queue per request), the record of a finished sequence, and its refusals."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from .metrics import SpecMetrics


class QueueFull(Exception):
    """Too many sequences are waiting; the client should retry later."""


class NotReady(Exception):
    """The engine is loading, failed to load, or the scheduler has stopped."""


@dataclass(frozen=True)
class SequenceRecord:
    """What the metrics adapter learns when a sequence ends (times from `time.monotonic`)."""

    arrival: float
    first_token_time: float | None
    finish_time: float
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # "stop", "length", "abort" (cancelled) or "error"
    # prompt tokens found in the KV cache (prefix caching); None: its prompt was never looked up (it got
    # no KV slot, or left before its first prefill chunk, where the lookup happens)
    cached_prompt_tokens: int | None = None


class SchedulerObserver(Protocol):
    def on_step(self, delta: SpecMetrics) -> None: ...
    def on_finish(self, record: SequenceRecord) -> None: ...


@dataclass(frozen=True)
class Event:
    """One step's result for choice `index` of a request, or its failure."""

    index: int
    time: float
    output: Any = None  # the step's output after `postprocess`
    error: BaseException | None = None
    finished: bool = False
    num_output_tokens: int = 0  # set on the finishing event
    num_cached_tokens: int = 0  # prompt tokens reused from the KV cache (prefix caching), likewise
    metrics: SpecMetrics | None = None  # set on the finishing event


class RequestGroup:
    """The sequences of one HTTP request (its choices); their events share one queue, in step order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, arrival: float) -> None:
        self.size = size
        self.arrival = arrival
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def next_event(self) -> Event:
        return await self._queue.get()

    def mark_cancelled(self) -> None:
        """Flag the request as over (the scheduler drops its sequences on its next turn)."""
        self._cancelled.set()

    def deliver(self, event: Event) -> None:
        """Called from the worker thread: hand the event to the request's event loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop has closed (server shutdown): nobody is listening any more
            pass


def spec_delta(current: SpecMetrics, before: SpecMetrics) -> SpecMetrics:
    """What a step added to a sequence's metrics."""
    per_pos = list(current.accepted_per_position)
    for pos, count in enumerate(before.accepted_per_position):
        per_pos[pos] -= count
    return SpecMetrics(
        current.verify_steps - before.verify_steps,
        current.proposed_draft_tokens - before.proposed_draft_tokens,
        current.accepted_draft_tokens - before.accepted_draft_tokens,
        per_pos,
        current.drafted_steps - before.drafted_steps,
    )


def settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """From the worker: complete `future` on its own event loop."""
    def resolve() -> None:
        if future.done():  # the awaiting request was cancelled (client gone)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        future.get_loop().call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop has closed: nobody is waiting
        pass

