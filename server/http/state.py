"""What one app holds (`app.state.specserve`): its settings, the scheduler that owns the engine, and
its metrics; every route reaches them through `state_of(request)`."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from ..engine.engine import Engine
from ..engine.errors import RequestError
from ..engine.events import NotReady
from ..engine.scheduler import Scheduler
from .errors import APIError, engine_error
from .prometheus import PrometheusMetrics
from .settings import ServerSettings


@dataclass
class ServerState:
    """Everything one app needs: its settings, scheduler (which owns the engine) and metrics."""

    settings: ServerSettings
    scheduler: Scheduler
    metrics: PrometheusMetrics
    created: int

    @property
    def engine(self) -> Engine | None:
        return self.scheduler.engine  # None until the worker has loaded the model

    @property
    def model_name(self) -> str:
        engine = self.scheduler.engine
        return self.settings.served_model_name or (engine.model_name if engine is not None else "")

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @staticmethod
    def now() -> int:
        return int(time.time())

    def ready(self) -> None:
        """Start the worker if nobody has (mounted apps), and refuse with 503 until the model is loaded."""
        self.scheduler.start()
        try:
            self.scheduler.check_ready()
        except NotReady as exc:
            raise engine_error(exc, self.settings.retry_after_s) from None

    async def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(engine, *args)` on the worker; what the engine raises becomes its HTTP error."""
        try:
            return await self.scheduler.call(fn, *args)
        except (RequestError, NotReady) as exc:
            raise engine_error(exc, self.settings.retry_after_s) from None

    def check_model(self, requested: str | None) -> None:
        engine = self.scheduler.engine
        if requested and requested not in (self.model_name, engine.model_name):
            raise APIError(404, f"the model '{requested}' does not exist; this server serves "
                           f"'{self.model_name}'", param="model", code="model_not_found")


def state_of(request: Request) -> ServerState:
    return request.app.state.specserve
