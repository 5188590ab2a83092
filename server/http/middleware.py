"""ASGI middleware: the request-body limit (413) and HTTP response counting.

Both are plain ASGI wrappers rather than Starlette's `BaseHTTPMiddleware`, which would buffer
streaming responses and hide client disconnects from the event stream.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {max_bytes} bytes")


class BodyLimit:
    """Refuse bodies over `max_bytes`: at once when Content-Length says so, else (chunked uploads)
    as soon as the bytes received pass the limit, so an oversized body is never buffered whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(self.max_bytes).response()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
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
