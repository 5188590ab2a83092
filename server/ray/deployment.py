"""The Ray Serve deployment: each replica builds specserve's own FastAPI app (`create_app`) around
its own engine, and Ray's HTTP proxy spreads requests over the replicas.

`serve.ingress()` without an app defers the app to the replica: `__serve_build_asgi_app__` runs
there after the constructor, so every replica loads its engine from the same `EngineConfig` in its
own process. The replica reports ready only once the model has loaded (a failed load fails the
replica's start with `ReplicaLoadError`, which Ray reports and retries); afterwards Ray's periodic
health check asks the scheduler (`check_ready`: a crashed worker or a stopped scheduler is
unhealthy, and Ray replaces the replica).

Shutdown (`serve.shutdown`, a scale-down, a redeploy): Ray stops routing to the replica, waits for
its running requests and kills the actor at `graceful_shutdown_timeout_s`, telling user code
nothing until the requests are done. The replica watches for the start of that drain (see
`ray_is_stopping`) and runs `specserve serve`'s own: running sequences finish for up to
`--shutdown-timeout`, then the scheduler stops and each open stream ends with an error event and
`[DONE]`. Ray's kill deadline is `SHUTDOWN_FLUSH_S` later, so those last events are written first.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.config import RequestRouterConfig

from ..engine.config import EngineConfig
from ..http import logs
from ..http.app import create_app
from ..http.serve import engine_factory
from ..http.settings import ServerSettings
from ..http.state import ServerState
from ..http.transport import SHUTDOWN_FLUSH_S
from .metrics import CounterMirror
from .routing import ConversationRouter

LOAD_POLL_S = 0.1  # how often a starting replica checks whether its model has loaded
STOP_POLL_S = 0.1  # how often a replica checks whether Ray has begun stopping it
# how often Ray checks whether a stopping replica's requests are done (Ray's default, 2 s, would
# let a drained replica idle that long inside its kill deadline)
RAY_DRAIN_CHECK_S = 0.2
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
    log_level: str = "info"  # of the replicas' own lines (access log, stats), as `specserve serve`'s
    log_format: str = "plain"

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
        if self.log_format not in logs.LOG_FORMATS:
            raise ValueError(f"log_format must be one of {logs.LOG_FORMATS}, got {self.log_format!r}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    def deployment_options(self, settings: ServerSettings) -> dict[str, Any]:
        """Ray's deployment options. A replica takes as many requests as its app admits
        (`max_active + max_queue`); beyond that they wait in Ray's proxy, at most `max_queue` of them
        per proxy (then Ray answers 503). A stopping replica ends its streams at `shutdown_timeout_s`;
        Ray kills it `SHUTDOWN_FLUSH_S` later."""
        options: dict[str, Any] = {
            "max_ongoing_requests": settings.max_active + settings.max_queue,
            "max_queued_requests": settings.max_queue,
            "graceful_shutdown_timeout_s": self.shutdown_timeout_s + SHUTDOWN_FLUSH_S,
            "graceful_shutdown_wait_loop_s": RAY_DRAIN_CHECK_S,
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


class ReplicaLoadError(RuntimeError):
    """A replica's model failed to load; `load_failure` finds its message in Ray's status."""


def load_failure(ray_message: str) -> str | None:
    """The reason a replica's model failed to load, from a deployment's status message in Ray (which
    holds the replica's traceback), or None when it names no such failure."""
    found = re.findall(rf"{ReplicaLoadError.__name__}: (.+)", ray_message)
    return found[-1].strip() if found else None


def ray_is_stopping() -> Callable[[], bool]:
    """A check of whether Ray has begun stopping this replica; call it in the replica's process.

    Ray Serve (2.60) has no hook for this: it sets `_shutting_down` on the replica object that hosts
    ours as the first step of its graceful shutdown, then waits for the running requests, so that
    private flag is the only sign. If a Ray upgrade moves it the replica does not start (rather than
    cut streams later), and the slow shutdown test checks the whole drain."""
    actor_id = ray.ActorID.from_hex(ray.get_runtime_context().get_actor_id())
    replica = getattr(ray._private.worker.global_worker.actors[actor_id], "_replica_impl", None)
    if not hasattr(replica, "_shutting_down"):
        raise RuntimeError(f"this Ray ({ray.__version__}) does not show when a replica stops; "
                           "specserve needs ray[serve]>=2.60,<3")
    return lambda: replica._shutting_down


@serve.ingress()
class SpecserveReplica:
    """One replica: specserve's app around one engine, built in the replica's own process."""

    def __init__(self, config: EngineConfig, settings: ServerSettings, threads: int, options: ReplicaOptions) -> None:
        self._config, self._settings, self._threads, self._options = config, settings, threads, options
        self._scheduler: Any = None
        self._tasks: list[asyncio.Task] = []  # held: the loop keeps only a weak reference

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """The app, returned once its model has loaded, so Ray routes nothing to a loading replica."""
        logs.configure(self._options.log_level, self._options.log_format)
        stopping = ray_is_stopping()  # before the load: a Ray it cannot read fails the replica at once
        failures: list[str] = []
        app = create_app(engine_factory(self._config, self._threads), self._settings, on_load_failure=failures.append)
        state = app.state.specserve
        self._scheduler = state.scheduler
        self._scheduler.start()  # idempotent: the app's lifespan, which Ray runs next, finds it started
        while self._scheduler.state == "loading":
            await asyncio.sleep(LOAD_POLL_S)
        if failures:
            raise ReplicaLoadError(f"the model failed to load: {failures[0]}")
        self._scheduler.check_ready()  # NotReady if the worker crashed right after loading
        self._tasks = [asyncio.create_task(CounterMirror(state.metrics.registry).run()),
                       asyncio.create_task(self._drain_when_ray_stops(state, stopping))]
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_tag)
        return app

    async def _drain_when_ray_stops(self, state: ServerState, stopping: Callable[[], bool]) -> None:
        """`specserve serve`'s drain once Ray begins stopping the replica (see the module docstring)."""
        while not stopping():
            await asyncio.sleep(STOP_POLL_S)
        await state.drain(self._options.shutdown_timeout_s)

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
    return deployment.bind(config, settings, threads, options)
