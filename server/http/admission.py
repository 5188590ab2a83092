"""Admission: whether a request gets in (else 429), decided before any of its heavy work, and how
long a refused client should wait.

A request is admitted when the sequences running, waiting and held by other admitted requests
leave room (`max_active + max_queue`, as the scheduler counts). Its sequences are then held while
its images are decoded and its prompt tokenized, so a burst cannot pass admission all at once and
overfill the queue once prepared; the hold ends when the scheduler takes the sequences (or the
request fails). Everything here runs on the event loop, except `DrainRate.add` (the worker's).

Retry-After estimates when the backlog will have drained, from the rate at which sequences finished
recently: (waiting + held + the request's own) / rate, within [`retry_after_s`, `MAX_RETRY_AFTER_S`]
(the upper end when nothing has finished lately).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import APIError

MAX_RETRY_AFTER_S = 60  # past this an estimate is a guess; clients should back off on their own
RATE_SAMPLES = 32  # finishes the drain rate averages over ...
RATE_WINDOW_S = 120.0  # ... if they are this recent: older ones describe another load


class DrainRate:
    """Sequences finished per second, recently: the last `RATE_SAMPLES` finishes over the time since
    the oldest of them, or, with fewer, the finishes of the last `RATE_WINDOW_S` (or of the uptime)
    over that time. Measured up to now, so a queue that has stopped draining has a falling rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._created = clock()
        self._finishes: deque[float] = deque(maxlen=RATE_SAMPLES)
        self._lock = threading.Lock()  # appended on the worker, read on the event loop

    def add(self, when: float) -> None:
        with self._lock:
            self._finishes.append(when)

    def per_second(self) -> float:
        now = self._clock()
        with self._lock:
            recent = [t for t in self._finishes if now - t <= RATE_WINDOW_S]
        since = recent[0] if len(recent) == RATE_SAMPLES else max(self._created, now - RATE_WINDOW_S)
        return len(recent) / max(now - since, 1.0)  # a second at least: no estimate from one instant


class Admission:
    """See the module docstring. `scheduler` is read for its running and waiting counts; `drain_rate`
    hears of every finished sequence."""

    def __init__(self, scheduler: Any, capacity: int, min_retry_after_s: int, drain_rate: DrainRate) -> None:
        self._scheduler = scheduler
        self._capacity = capacity
        self._min_retry_s = min_retry_after_s
        self._drain_rate = drain_rate
        self.held = 0  # sequences of admitted requests that the scheduler has not taken yet

    def check_room(self, size: int = 1) -> None:
        """Raise the 429 if the system is full; with `size` 1, before a request's body is even read."""
        if self._scheduler.num_running + self._scheduler.num_waiting + self.held >= self._capacity:
            raise self.queue_full(size)

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Admit a request of `size` sequences or raise a 429; hold its room until the block ends
        (the block submits the sequences, which the scheduler then counts itself)."""
        self.check_room(size)
        self.held += size
        try:
            yield
        finally:
            self.held -= size

    def queue_full(self, size: int) -> APIError:
        return APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                        code="queue_full", headers={"Retry-After": str(self.retry_after(size))})

    def retry_after(self, size: int) -> int:
        """Seconds until the backlog ahead of a request of `size` sequences should have drained."""
        rate = self._drain_rate.per_second()
        backlog = self._scheduler.num_waiting + self.held + size
        estimate = math.ceil(backlog / rate) if rate > 0 else MAX_RETRY_AFTER_S  # nothing drains lately
        return max(self._min_retry_s, min(estimate, MAX_RETRY_AFTER_S))
