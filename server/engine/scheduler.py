"""The scheduler: one worker thread owns the engine and interleaves the sequences of many requests.

The engine is not thread-safe and a step is blocking compute, so a single worker thread calls
`start`, `step_batch` and `release` (and, through `call`, anything else that must not run beside a
step; preparing prompts only reads the tokenizer, so the HTTP layer does it in its own pool); the
event loop only queues work and awaits results. Continuous batching: each loop turn admits waiting
sequences while KV slots are free, then steps EVERY active sequence in one `step_batch` (new ones
take their next prompt chunk, the others are verified together in one target forward), so sequences
join and leave between turns and nobody waits for another's whole generation. At most
`max_active` sequences (and no more than the engine's KV slots) are active; the rest wait in FIFO
order, and once `max_active + max_queue` sequences are in the system new requests are refused
(`QueueFull`, an HTTP 429).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import SamplingParams
from .errors import RequestError
from .events import (
    Event,
    NotReady,
    QueueFull,
    RequestGroup,
    SchedulerObserver,
    SequenceRecord,
    settle,
    spec_delta,
)
from .metrics import SpecMetrics
from .outputs import PromptInput, StepOutput
from .sequence import Sequence

logger = logging.getLogger(__name__)


class SteppingEngine(Protocol):
    """What the scheduler drives (an `Engine`, or a scripted stand-in in tests)."""

    def start(self, prompt: PromptInput, params: SamplingParams) -> Sequence: ...
    def step_batch(self, seqs: list[Sequence]) -> list[StepOutput | Exception | None]: ...
    def release(self, seq: Sequence) -> None: ...


@dataclass(eq=False)
class _Entry:
    group: RequestGroup
    index: int
    prompt: PromptInput
    params: SamplingParams
    seq: Sequence | None = None
    first_token_time: float | None = None
    reported: SpecMetrics = field(default_factory=SpecMetrics)  # already passed to the observer


class Scheduler:
    """Runs the engine on its own thread; see the module docstring for the policy."""

    def __init__(
        self, engine_or_factory: SteppingEngine | Callable[[], SteppingEngine], *, max_active: int,
        max_queue: int, postprocess: Callable[[SteppingEngine, StepOutput], Any] | None = None,
        observer: SchedulerObserver | None = None,
        on_load_failure: Callable[[str], None] | None = None,
    ) -> None:
        """`on_load_failure(reason)` is called (on the worker) when the factory raises: `specserve
        serve` then exits. Without it the failure is logged and every request answers 503."""
        # An engine has `step`; anything else callable is a factory that builds one on the worker.
        is_engine = hasattr(engine_or_factory, "step")
        self._engine = engine_or_factory if is_engine else None
        self._factory = None if is_engine else engine_or_factory
        self._max_active, self._max_queue = max_active, max_queue
        self._postprocess = postprocess
        self._observer = observer
        self._on_load_failure = on_load_failure
        self._cond = threading.Condition()
        self._calls: deque[tuple] = deque()
        self._waiting: deque[_Entry] = deque()
        self._active: deque[_Entry] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.state = "ready" if is_engine else "idle"  # idle -> loading -> ready | failed; stopped
        self.load_error: str | None = None

    # ---- event-loop side -------------------------------------------------------------------
    @property
    def engine(self) -> SteppingEngine | None:
        return self._engine

    @property
    def num_running(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        """Start the worker (idempotent); a factory is called on the worker, so loading never blocks
        the event loop."""
        with self._cond:
            if self._thread is not None:
                return
            if self._factory is not None:
                self.state = "loading"
            self._thread = threading.Thread(target=self._run, name="specserve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; pending requests fail with `NotReady`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.state = "stopped"

    def check_ready(self) -> None:
        if self.state == "ready" and not self._stopping:
            return
        if self.state in ("idle", "loading"):
            raise NotReady("the model is loading; retry shortly")
        if self.state == "failed":
            raise NotReady(f"the model failed to load: {self.load_error}")
        raise NotReady("the server is shutting down")

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(engine, *args)` on the worker, between steps (tokenizer, chat template, ...)."""
        self.check_ready()
        future = asyncio.get_running_loop().create_future()
        with self._cond:
            self._calls.append((fn, args, future))
            self._cond.notify()
        return await future

    def submit(self, prompts: list, params: list, arrival: float | None = None) -> RequestGroup:
        """Queue one sequence per (prompt, params) pair as one request; raises `QueueFull`."""
        self.check_ready()
        group = RequestGroup(asyncio.get_running_loop(), len(prompts), arrival or time.monotonic())
        with self._cond:
            # A request that finds room is taken whole, so a large n cannot starve behind small ones.
            if len(self._active) + len(self._waiting) >= self._max_active + self._max_queue:
                raise QueueFull(f"{len(self._waiting)} sequences are already waiting")
            for index, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
                self._waiting.append(_Entry(group, index, prompt, sp))
            self._cond.notify()
        return group

    def cancel(self, group: RequestGroup) -> None:
        """Drop the request's sequences and free their KV memory before the worker's next step."""
        group.mark_cancelled()
        with self._cond:
            self._cond.notify()

    # ---- worker side -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self._load():
                while self._next_turn():
                    pass
        except Exception as exc:  # a scheduler bug: fail what is pending rather than leave it hanging
            logger.exception("the scheduler's worker crashed")
            self.state, self.load_error = "failed", f"the worker crashed: {type(exc).__name__}: {exc}"
        finally:
            self._shutdown()

    def _load(self) -> bool:
        if self._factory is None:
            return True
        try:
            self._engine = self._factory()
        except Exception as exc:  # any load failure: one line for the operator, 503 for clients
            logger.debug("loading the engine failed", exc_info=True)
            self.state, self.load_error = "failed", f"{type(exc).__name__}: {exc}"
            if self._on_load_failure is not None:
                self._on_load_failure(self.load_error)
            else:
                logger.error("the model failed to load: %s (--log-level debug shows where)", self.load_error)
            return False
        self.state = "ready"
        return True

    def _next_turn(self) -> bool:
        """One turn: run queued calls, drop cancelled sequences, admit waiting ones, step one."""
        with self._cond:
            while not (self._stopping or self._calls or self._waiting or self._active):
                self._cond.wait()
            if self._stopping:
                return False
            calls, self._calls = self._calls, deque()
        for call in calls:
            self._run_call(*call)
        self._drop_cancelled()
        self._admit()
        if self._active:
            self._step_batch(list(self._active))
        return True

    def _run_call(self, fn: Callable[..., Any], args: tuple, future: asyncio.Future) -> None:
        try:
            result, error = fn(self._engine, *args), None
        except Exception as exc:  # handed to the awaiting request, which maps it to a response
            result, error = None, exc
        settle(future, result, error)

    def _drop_cancelled(self) -> None:
        with self._cond:
            dropped = [e for e in self._active if e.group.cancelled]
            dropped += [e for e in self._waiting if e.group.cancelled]
            self._active = deque(e for e in self._active if not e.group.cancelled)
            self._waiting = deque(e for e in self._waiting if not e.group.cancelled)
        for entry in dropped:
            self._finish(entry, "abort")

    def _admit(self) -> None:
        slots = getattr(self._engine, "num_slots", self._max_active)  # the engine's KV slots bound the batch
        while len(self._active) < min(self._max_active, slots):
            with self._cond:
                if not self._waiting:
                    return
                entry = self._waiting.popleft()
            try:
                entry.seq = self._engine.start(entry.prompt, entry.params)
            except Exception as exc:  # RequestError is the client's fault; anything else fails this request only
                if not isinstance(exc, RequestError):
                    logger.exception("engine.start failed")
                self._fail(entry, exc)
                continue
            with self._cond:
                self._active.append(entry)

    def _step_batch(self, entries: list[_Entry]) -> None:
        try:
            outs = self._engine.step_batch([entry.seq for entry in entries])
        except Exception as exc:  # the batch's forward failed: its requests fail, the worker goes on
            logger.exception("engine.step_batch failed")
            outs = [exc] * len(entries)
        now = time.monotonic()
        for entry, out in zip(entries, outs):
            self._settle_step(entry, out, now)

    def _settle_step(self, entry: _Entry, out: Any, now: float) -> None:
        """Deliver one sequence's step (or its failure) to its request."""
        if out is None:  # still prefilling its prompt: nothing to deliver yet
            return
        if not isinstance(out, Exception):
            try:
                payload = self._postprocess(self._engine, out) if self._postprocess else out
            except Exception as exc:  # a failure of this sequence's output only
                out = exc
        if isinstance(out, Exception):  # an engine bug fails this request only; the batch goes on
            if not isinstance(out, RequestError):
                logger.error("a sequence failed: %s", out, exc_info=out)
            with self._cond:
                self._active.remove(entry)
            self._fail(entry, out)
            return
        if entry.first_token_time is None:
            entry.first_token_time = now
        self._observe_step(entry)
        if not out.finished:
            entry.group.deliver(Event(entry.index, now, output=payload))
            return
        with self._cond:
            self._active.remove(entry)
        metrics = copy.deepcopy(entry.seq.metrics)
        num_tokens, cached = len(entry.seq.output_ids), entry.seq.cached_tokens
        self._finish(entry, out.finish_reason or "stop")  # frees KV before the client hears "done"
        entry.group.deliver(Event(entry.index, now, payload, None, True, num_tokens, cached, metrics))

    def _fail(self, entry: _Entry, exc: BaseException) -> None:
        entry.group.mark_cancelled()  # the request has failed: its other choices stop too
        self._finish(entry, "error")
        entry.group.deliver(Event(entry.index, time.monotonic(), error=exc, finished=True))

    def _observe_step(self, entry: _Entry) -> None:
        if self._observer is None:
            return
        current = entry.seq.metrics
        self._notify(self._observer.on_step, spec_delta(current, entry.reported))
        entry.reported = copy.deepcopy(current)

    @staticmethod
    def _notify(hook: Callable[[Any], None], value: Any) -> None:
        try:
            hook(value)
        except Exception:  # metrics must never break serving
            logger.exception("a scheduler observer failed")

    def _finish(self, entry: _Entry, reason: str) -> None:
        if entry.seq is not None:
            try:
                self._engine.release(entry.seq)
            except Exception:  # a failed release must not stop the worker; the sequence is gone anyway
                logger.exception("engine.release failed")
        if self._observer is not None:
            self._notify(self._observer.on_finish, SequenceRecord(
                entry.group.arrival, entry.first_token_time, time.monotonic(),
                len(entry.prompt.token_ids), len(entry.seq.output_ids) if entry.seq is not None else 0,
                reason, entry.seq.cached_tokens if entry.seq is not None and entry.seq.prefix_len else None,
            ))

    def _shutdown(self) -> None:
        with self._cond:
            entries = list(self._active) + list(self._waiting)
            self._active, self._waiting = deque(), deque()
            calls, self._calls = self._calls, deque()
        for entry in entries:
            self._finish(entry, "abort")
            entry.group.deliver(Event(entry.index, time.monotonic(), error=NotReady("server stopped"),
                                       finished=True))
        for _, _, future in calls:
            settle(future, None, NotReady("server stopped"))

