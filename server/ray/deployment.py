"""The Ray Serve deployment: each replica builds specserve's own FastAPI app (`create_app`) around
its own engine, and Ray's HTTP proxy spreads requests over the replicas.

`serve.ingress()` without an app defers the app to the replica: `__serve_build_asgi_app__` runs
there after the constructor, so every replica loads its engine from the same `EngineConfig` in its
own process. The replica reports ready only once the model has loaded (a failed load fails the
replica's start, which Ray reports and retries); afterwards Ray's periodic health check asks the
scheduler (`check_ready`: a crashed worker or a stopped scheduler is unhealthy, and Ray replaces
the replica). Shutdown is Ray's: a stopping replica gets no new requests and its running ones may
finish for up to `graceful_shutdown_timeout_s` (`--shutdown-timeout`); once they have, the app's
lifespan stops the scheduler. Ray tells user code nothing when the drain begins, so a stream still
running at the deadline is cut when Ray kills the replica (the client sees a connection error, not
the error event `specserve serve` would send).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.config import RequestRouterConfig

from ..engine.config import EngineConfig
from ..http.app import create_app
from ..http.serve import engine_factory
from ..http.settings import ServerSettings
from .metrics import SpecDecodeMirror
from .routing import ConversationRouter

LOAD_POLL_S = 0.1  # how often a starting replica checks whether its model has loaded
REPLICA_HEADER = b"x-specserve-replica"  # names the replica that answered (affinity is visible)
ROUTE_BY = ("conversation", "none")


@dataclass(frozen=True)
class ReplicaOptions:
    """How many replicas and what each holds; `deployment_options` turns it into Ray's options."""

    replicas: int = 1  # fixed count, unless min/max_replicas turn autoscaling on
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # autoscaling target per replica; None = max_active
    num_cpus: float = 1.0  # per replica (Ray schedules replicas by these)
    num_gpus: float = 0.0
    route_by: str = "conversation"  # X-Conversation-Id affinity (routing.py), or Ray's default ("none")
    shutdown_timeout_s: float = 5.0  # running requests' time to finish when a replica stops

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas")
        if self.autoscaling and not 0 <= self.min_replicas <= self.max_replicas >= 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas}..{self.max_replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.shutdown_timeout_s < 0:
            raise ValueError("num_cpus, num_gpus and shutdown_timeout_s must be >= 0")
        if self.route_by not in ROUTE_BY:
            raise ValueError(f"route_by must be one of {ROUTE_BY}, got {self.route_by!r}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    def deployment_options(self, settings: ServerSettings) -> dict[str, Any]:
        """Ray's deployment options. A replica takes as many requests as its app admits
        (`max_active + max_queue`); beyond that they wait in Ray's proxy, at most `max_queue` of them
        per proxy (then Ray answers 503)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": settings.max_active + settings.max_queue,
            "max_queued_requests": settings.max_queue,
            "graceful_shutdown_timeout_s": self.shutdown_timeout_s,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or settings.max_active,
            }
        else:
            options["num_replicas"] = self.replicas
        if self.route_by == "conversation":
            options["request_router_config"] = RequestRouterConfig(request_router_class=ConversationRouter)
        return options


@serve.ingress()
class SpecserveReplica:
    """One replica: specserve's app around one engine, built in the replica's own process."""

    def __init__(self, config: EngineConfig, settings: ServerSettings, threads: int) -> None:
        self._config, self._settings, self._threads = config, settings, threads
        self._scheduler: Any = None
        self._mirror_task: asyncio.Task | None = None  # held: the loop keeps only a weak reference

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """The app, returned once its model has loaded, so Ray routes nothing to a loading replica."""
        app = create_app(engine_factory(self._config, self._threads), self._settings)
        state = app.state.specserve
        self._scheduler = state.scheduler
        self._scheduler.start()  # idempotent: the app's lifespan, which Ray runs next, finds it started
        while self._scheduler.state == "loading":
            await asyncio.sleep(LOAD_POLL_S)
        self._scheduler.check_ready()  # NotReady with the load error: the replica fails to start
        self._mirror_task = asyncio.create_task(SpecDecodeMirror(state.metrics.registry).run())
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_tag)
        return app

    def check_health(self) -> None:
        """Ray's health check: raises (NotReady) once the engine's worker has crashed or stopped."""
        self._scheduler.check_ready()


class ReplicaHeader:
    """ASGI middleware: every response carries `X-Specserve-Replica: <Ray's replica tag>`."""

    def __init__(self, app: Any, replica: str) -> None:
        self._app, self._value = app, replica.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)

        async def send_tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self._value)]
            await send(message)

        await self._app(scope, receive, send_tagged)


def build_application(config: EngineConfig, settings: ServerSettings, threads: int,
                      options: ReplicaOptions) -> serve.Application:
    """The bound application that `serve.run` deploys."""
    deployment = serve.deployment(SpecserveReplica, name="specserve", **options.deployment_options(settings))
    return deployment.bind(config, settings, threads)
