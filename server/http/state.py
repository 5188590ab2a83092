"""What one app holds (`app.state.specserve`): its settings, the scheduler that owns the engine, the
admission control, the prepare pool and its metrics; every route reaches them through `state_of(request)`."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from ..engine.config import SamplingParams
from ..engine.engine import Engine
from ..engine.errors import RequestError
from ..engine.events import NotReady
from ..engine.scheduler import Scheduler
from .admission import Admission
from .errors import APIError, engine_error
from .prepare import PreparePool
from .prometheus import PrometheusMetrics
from .settings import ServerSettings

DRAIN_POLL_S = 0.05  # how often a draining server checks whether its requests have finished


@dataclass
class ServerState:
    """Everything one app needs: its settings, scheduler (which owns the engine), admission, the
    prepare pool and metrics."""

    settings: ServerSettings
    scheduler: Scheduler
    admission: Admission
    pool: PreparePool
    metrics: PrometheusMetrics
    created: int
    draining: bool = False  # set by `drain`: new requests get 503

    @property
    def engine(self) -> Engine | None:
        return self.scheduler.engine  # None until the worker has loaded the model

    @property
    def model_names(self) -> tuple[str, ...]:
        """The ids requests may name; the first is the one responses carry."""
        engine = self.scheduler.engine
        return self.settings.served_model_names or ((engine.model_name,) if engine is not None else ("",))

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @staticmethod
    def now() -> int:
        return int(time.time())

    def ready(self) -> None:
        """Start the worker if nobody has (mounted apps), and refuse with 503 until the model is
        loaded, and once draining. A failed load's reason stays in the log: it may name files."""
        self.scheduler.start()
        if self.draining:
            raise APIError(503, "the server is shutting down", code="unavailable")
        if self.scheduler.state == "failed":
            raise APIError(503, "the model failed to load; the server's log has the reason", code="unavailable")
        try:
            self.scheduler.check_ready()
        except NotReady as exc:
            raise engine_error(exc, self.settings.retry_after_s) from None

    async def prepare(self, fn: Any, *args: Any) -> Any:
        """Run `fn(engine, *args)` (template, tokenizer) in the prepare pool; the engine's
        `RequestError` becomes a 400."""
        try:
            return await self.pool.run(fn, self.scheduler.engine, *args)
        except RequestError as exc:
            raise engine_error(exc) from None

    async def check_format(self, params: list[SamplingParams], field: str | None = None) -> None:
        """Compile the request's response format (all its choices share one) in the prepare pool: a
        schema the grammar engine refuses is a 400 (naming `field` if given: the request field the
        grammar was made from), and the engine's worker finds the grammar cached."""
        fmt = params[0].response_format if params else None
        if fmt is None:
            return
        try:
            await self.pool.run(self.scheduler.engine.check_response_format, fmt)
        except RequestError as exc:
            raise engine_error(RequestError(exc.message, field or exc.param)) from None

    @property
    def busy(self) -> bool:
        return self.scheduler.num_running + self.scheduler.num_waiting + self.admission.held > 0

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: refuse new requests (503), let admitted ones run for up to `timeout`
        seconds, then stop the scheduler, which fails what is left (open streams end with an error
        event and `[DONE]`, waiting JSON requests get a 503) and releases its KV memory."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.busy:
            await asyncio.to_thread(self.scheduler.stop)

    def check_model(self, requested: str | None) -> None:
        engine = self.scheduler.engine
        if requested and requested not in (*self.model_names, engine.model_name):
            served = ", ".join(f"'{name}'" for name in self.model_names)
            raise APIError(404, f"the model '{requested}' does not exist; this server serves {served}",
                           param="model", code="model_not_found")


def state_of(request: Request) -> ServerState:
    return request.app.state.specserve
