"""What `specserve serve` logs: the handler of the `specserve` (and uvicorn's) loggers, plain text or
one JSON object per line; one access line per API request; and, every few seconds while the server
is busy, a stats line like vLLM's (throughput, queue, KV cache, acceptance).

No prompt or output text is ever logged: an access line has counts and times only.
The formatters are the standard library's, with a line's extra fields appended (`fields=...`): a
logging library would add a dependency for about twenty lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.events import SequenceRecord
from ..engine.metrics import SpecMetrics

LOG_FORMATS = ("plain", "json")
access_logger = logging.getLogger("specserve.access")
stats_logger = logging.getLogger("specserve.stats")
UNLOGGED_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapes would drown the requests


class PlainFormatter(logging.Formatter):
    """`time level logger: message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        return super().format(record) + "".join(f" {key}={value}" for key, value in fields.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the line's fields, any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), **(getattr(record, "fields", None) or {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info", fmt: str = "plain") -> None:
    """Send the `specserve` and `uvicorn` loggers to stderr in `fmt`, at `level`."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    for name in ("specserve", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


@dataclass
class RequestLog:
    """What a request's access line reports beyond status and time; the generation code fills it."""

    request_id: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    mean_accepted_length: float | None = None

    def generated(self, prompt_tokens: int, completion_tokens: int, ttft_s: float, metrics: SpecMetrics) -> None:
        self.prompt_tokens, self.completion_tokens, self.ttft_s = prompt_tokens, completion_tokens, ttft_s
        self.mean_accepted_length = round(metrics.mean_accepted_length, 2) if metrics.verify_steps else None


_current: ContextVar[RequestLog | None] = ContextVar("specserve_request_log", default=None)


def current_request() -> RequestLog | None:
    """The access record of the request being served (None outside `AccessLog`, e.g. a mounted app)."""
    return _current.get()


class AccessLog:
    """One `specserve.access` line per request once its response has gone (a stream: after `[DONE]`):
    request id, method, path, status, duration, and for generation token counts, TTFT and mean
    accepted length. Inside `RequestId`, whose id it reports; /health and /metrics are not logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in UNLOGGED_PATHS:
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), 0
        record = RequestLog(scope.get("state", {}).get("request_id", "-"))
        token = _current.set(record)

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _current.reset(token)
            fields = {"request_id": record.request_id, "method": scope["method"], "path": scope["path"],
                      "status": status, "duration_ms": round((time.monotonic() - start) * 1000)}
            if record.completion_tokens is not None:
                fields.update(prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
                              ttft_ms=round(record.ttft_s * 1000), mean_accepted_length=record.mean_accepted_length)
            access_logger.info("%s %s %d", scope["method"], scope["path"], status, extra={"fields": fields})


class StatsLog:
    """Every `interval_s` (from the app's lifespan), unless the server was idle all along, one
    `specserve.stats` line: generation throughput (tokens emitted by decode steps; a sequence's first
    token, from its prefill, is not counted), running and waiting sequences, KV cache usage, and the
    interval's acceptance (mean accepted length incl. bonus, draft acceptance rate, per position).
    Fed by the scheduler's observer hooks, which run on the worker thread."""

    def __init__(self, interval_s: float, running: Callable[[], int], waiting: Callable[[], int],
                 kv_usage: Callable[[], float]) -> None:
        self.interval_s = interval_s
        self._running, self._waiting, self._kv_usage = running, waiting, kv_usage
        self._lock = threading.Lock()
        self._spec, self._finished = SpecMetrics(), 0
        self._since = time.monotonic()

    def on_step(self, delta: SpecMetrics) -> None:
        with self._lock:
            self._spec.merge(delta)

    def on_finish(self, record: SequenceRecord) -> None:
        with self._lock:
            self._finished += 1

    def take(self, now: float) -> dict | None:
        """The fields of the line for the interval ending `now` (counters restart); None if idle."""
        with self._lock:
            spec, finished = self._spec, self._finished
            self._spec, self._finished = SpecMetrics(), 0
        elapsed, self._since = max(now - self._since, 1e-9), now
        running, waiting = self._running(), self._waiting()
        if spec.verify_steps == 0 and finished == 0 and running == 0 and waiting == 0:
            return None
        return {
            "generation_tokens_per_s": round((spec.verify_steps + spec.accepted_draft_tokens) / elapsed, 1),
            "running": running, "waiting": waiting, "finished": finished,
            "kv_cache_usage": f"{self._kv_usage():.1%}",
            "mean_accepted_length": round(spec.mean_accepted_length, 2),
            "draft_acceptance_rate": f"{spec.acceptance_rate:.1%}",
            "per_position_acceptance": ",".join(f"{rate:.2f}" for rate in spec.per_position_acceptance),
        }

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            fields = self.take(time.monotonic())
            if fields is not None:
                stats_logger.info("stats", extra={"fields": fields})
