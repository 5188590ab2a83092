"""The OpenAI-compatible app: `create_app(engine_or_factory, settings)`.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models[/{model}]`,
`GET /health`, `GET /metrics`, and unless `settings.ui` is off the playground: `GET /` and its
files under `/static/` (`static/`: plain HTML, JS and CSS, no build step; the page calls the API).
All per-app state lives on `app.state.specserve` (a `ServerState`), so several apps can live in one
process and another service can mount this one. A mounted app's lifespan does not run, so the
worker also starts on the first request; such a host should call
`app.state.specserve.scheduler.stop()` when it shuts down (or first `await ...drain(timeout)`, as
`specserve serve` does on SIGTERM).

A request's path: ready? (503) -> room? (429) -> body limits (size, read time) -> JSON parse
(strict) -> cheap checks (n, images, text length) -> admission of its sequences (429) -> images
and tokenizing in the prepare pool -> the scheduler, whose worker only starts, steps and releases
sequences.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from ... import __version__
from ..engine.drafters import suffix_stats
from ..engine.engine import Engine
from ..engine.events import SequenceRecord
from ..engine.metrics import SpecMetrics
from ..engine.scheduler import Scheduler
from .admission import Admission, DrainRate
from .chat import serve_chat
from .completions import serve_completion
from .errors import APIError, from_validation_error, install_error_handlers
from .generation import postprocess
from .logs import AccessLog, StatsLog
from .middleware import BodyLimit, CountResponses, RequestId, RequireApiKey
from .prepare import PreparePool
from .prometheus import CONTENT_TYPE, PrometheusMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, field_path
from .responses import ModelCard, ModelList
from .settings import ServerSettings
from .sse import ClientGone, unless_disconnected
from .state import ServerState, state_of

M = TypeVar("M", bound=BaseModel)
STATIC = Path(__file__).parent / "static"
# the page loads nothing from elsewhere; images come from the user's own files as data: URLs
PAGE_POLICY = "default-src 'self'; img-src 'self' data:"
PARSE_IN_THREAD_BYTES = 256 * 1024  # larger bodies (inline images) are parsed off the event loop
CLIENT_CLOSED = 499  # nginx's convention; nobody reads it, the client has gone


class ClientLeft(Exception):
    """The client disconnected while its request body was being read."""


async def _parse(request: Request, model: type[M]) -> M:
    """The body as `model`: JSON only, checked before a byte of it is read."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"the request body must be application/json, not {media_type or 'untyped'}")
    try:
        body = await request.body()
    except ClientDisconnect:
        raise ClientLeft() from None
    try:
        if len(body) > PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(model.model_validate_json, body)
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc, field_path) from None


router = APIRouter()


async def _generate(request: Request, body_model: type[M], serve: Any) -> Response:
    """Check readiness and room (a loading, draining or full server reads no body), parse, check
    the model, then serve; a client that leaves cancels the work."""
    arrival = time.monotonic()
    state = state_of(request)
    state.ready()
    state.admission.check_room()
    try:
        req = await _parse(request, body_model)
    except ClientLeft:
        return Response(status_code=CLIENT_CLOSED)
    state.check_model(req.model)
    try:
        return await unless_disconnected(request, serve(state, req, arrival))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions; the body is a `ChatCompletionRequest`."""
    return await _generate(request, ChatCompletionRequest, serve_chat)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> Response:
    """OpenAI (legacy) text completions; the body is a `CompletionRequest`."""
    return await _generate(request, CompletionRequest, serve_completion)


def _card(state: ServerState, name: str) -> ModelCard:
    engine = state.scheduler.engine
    return ModelCard(id=name, created=state.created, root=engine.model_name, max_model_len=engine.max_model_len)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = state_of(request)
    state.ready()
    return ModelList(data=[_card(state, name) for name in state.model_names]).model_dump()


@router.get("/v1/models/{model:path}")
async def get_model(request: Request, model: str) -> dict:
    state = state_of(request)
    state.ready()
    state.check_model(model)
    return _card(state, model if model in state.model_names else state.model_name).model_dump()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded; 503 (with the reason) while loading or after a failed load."""
    state_of(request).ready()
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.exposition(), media_type=CONTENT_TYPE)


async def playground() -> FileResponse:
    """The playground page; open like /health (it holds no model output, the API calls it makes
    carry the key the user types)."""
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


def create_app(
    engine_or_factory: Engine | Callable[[], Engine], settings: ServerSettings | None = None,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """An app serving an `Engine`, or a zero-argument factory that builds one (called on the worker
    thread, so the app answers /health with 503 while the model loads). `on_load_failure(reason)`
    hears a failed load (the CLI exits); without it the app answers 503 with the reason."""
    settings = settings or ServerSettings()
    # The gauges read the scheduler when scraped; the scheduler reports steps to the metrics.
    def kv_usage() -> float:
        return getattr(state.scheduler.engine, "kv_cache_usage", 0.0)  # 0 until the model loads

    prometheus = PrometheusMetrics(
        model_name=lambda: state.model_name,
        running=lambda: state.scheduler.num_running,
        waiting=lambda: state.scheduler.num_waiting,
        kv_usage=kv_usage,
        suffix_stats=lambda: suffix_stats(getattr(state.scheduler.engine, "proposer", None)),
    )
    drain_rate = DrainRate()
    stats = StatsLog(settings.log_stats_interval_s, running=lambda: state.scheduler.num_running,
                     waiting=lambda: state.scheduler.num_waiting, kv_usage=kv_usage)
    scheduler = Scheduler(engine_or_factory, max_active=settings.max_active, max_queue=settings.max_queue,
                          postprocess=postprocess, observer=_Observers(prometheus, drain_rate, stats),
                          on_load_failure=on_load_failure)
    admission = Admission(scheduler, settings.max_active + settings.max_queue, settings.retry_after_s, drain_rate)
    pool = PreparePool(settings.prepare_workers)
    state = ServerState(settings, scheduler, admission, pool, prometheus, int(time.time()))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        stats_task = asyncio.create_task(stats.run()) if settings.log_stats_interval_s > 0 else None
        yield
        if stats_task is not None:
            stats_task.cancel()
        await asyncio.to_thread(scheduler.stop)
        pool.shutdown()

    app = FastAPI(title="specserve", version=__version__, lifespan=lifespan)
    app.state.specserve = state
    install_error_handlers(app)
    app.include_router(router)
    if settings.ui:
        app.add_api_route("/", playground, methods=["GET"], include_in_schema=False)
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # the last added runs first: count -> request id -> access log -> CORS (answers preflights, labels even a 401 for
    # the browser) -> API key (before the body is read) -> body limits -> routes
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    if settings.api_key is not None:
        app.add_middleware(RequireApiKey, api_key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(AccessLog)
    app.add_middleware(RequestId)
    endpoints = [route.path for route in router.routes]
    app.add_middleware(CountResponses, counter=prometheus.http_requests, endpoints=endpoints)
    return app


class _Observers:
    """The scheduler's hooks, heard by the metrics, admission's drain rate and the stats line."""

    def __init__(self, metrics: PrometheusMetrics, drain_rate: DrainRate, stats: StatsLog) -> None:
        self._metrics, self._drain_rate, self._stats = metrics, drain_rate, stats

    def on_step(self, delta: SpecMetrics) -> None:
        self._metrics.on_step(delta)
        self._stats.on_step(delta)

    def on_finish(self, record: SequenceRecord) -> None:
        self._metrics.on_finish(record)
        self._drain_rate.add(record.finish_time)
        self._stats.on_finish(record)
