"""ASGI middleware: the request-body limits (size: 413; read time: 408), the API key (401), request
ids (`X-Request-Id`) and HTTP response counting. CORS is Starlette's own `CORSMiddleware`.

Both are plain ASGI wrappers rather than Starlette's `BaseHTTPMiddleware`, which would buffer
streaming responses and hide client disconnects from the event stream.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import uuid
from collections.abc import Collection

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError


def _header(scope: Scope, name: bytes) -> bytes:
    """The value of request header `name` (lower-case), or b"" when absent."""
    return dict(scope.get("headers") or []).get(name, b"")


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {max_bytes} bytes")


def _too_slow(timeout_s: float) -> APIError:
    # Connection: close, because the rest of the body may still be on its way.
    return APIError(408, f"the request body did not arrive within this server's limit of {timeout_s} s",
                    headers={"Connection": "close"})


class BodyLimit:
    """Refuse bodies over `max_bytes`: at once when Content-Length says so, else (chunked uploads)
    as soon as the bytes received pass the limit, so an oversized body is never buffered whole.
    Refuse bodies still incomplete `timeout_s` after the request's head arrived (a client that
    trickles or stalls its body would otherwise hold a connection and a task for ever)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(self.max_bytes).response()(scope, receive, send)
            return
        received, complete = 0, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body only http.disconnect comes, whenever the client leaves
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                raise _too_slow(self.timeout_s) from None  # the app's APIError handler answers 408
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _too_large(self.max_bytes)  # the app's APIError handler answers 413
            return message

        await self.app(scope, limited_receive, send)


class CountResponses:
    """Count responses by route and status (`specserve:http_requests_total`)."""

    def __init__(self, app: ASGIApp, counter: Counter, endpoints: Collection[str]) -> None:
        self.app = app
        self.counter = counter
        self.endpoints = frozenset(endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"  # bounded label values

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class RequireApiKey:
    """`Authorization: Bearer <key>` on every request under `prefix` (the OpenAI API), compared in
    constant time; 401 with an OpenAI error body otherwise, before any of the body is read.
    /health and /metrics stay open: load balancers and Prometheus scrape them without credentials,
    and they carry no model output."""

    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/v1/") -> None:
        self.app = app
        self.key = api_key.encode()
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(self.prefix):
            scheme, _, token = _header(scope, b"authorization").partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                error = APIError(401, "a valid API key is required: send it as `Authorization: Bearer <key>`",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")  # printable ASCII without spaces: safe in headers and logs


class RequestId:
    """Every response carries `X-Request-Id`: the client's own when it sent a usable one (printable
    ASCII, at most 128 characters), else a new random one. It is kept in `scope["state"]["request_id"]`
    for the request's log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
