"""Server-sent events and client disconnects.

The stream carries `data: {json}` events and a final `data: [DONE]`, as OpenAI's does, and, while
the first token is awaited, `: ping` comments (which SSE clients skip). A client
that goes away must free its sequences at once, whatever the ASGI server reports: so the response
watches `http.disconnect` itself while it streams, and a non-streaming request races its generation
against the same message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .errors import error_body

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"  # an SSE comment: clients skip it, proxies see traffic
T = TypeVar("T")
logger = logging.getLogger(__name__)


def sse_event(payload: dict) -> bytes:
    """One `data:` event; compact JSON never contains a raw newline, so one line is one event."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


INTERNAL_ERROR = sse_event(error_body("internal server error", "server_error", None, "internal_error"))


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


class EventStream(Response):
    """A `text/event-stream` response that stops, and calls `on_close`, as soon as the client leaves."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        # No Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._pump, send, tasks.cancel_scope)
                await _wait_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            self._on_close()

    async def _pump(self, send: Send, scope: anyio.CancelScope) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                async for chunk in self._events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except OSError:
                raise
            except Exception:  # a bug while rendering: the headers are out, so end the stream cleanly
                logger.exception("the event stream failed")
                await send({"type": "http.response.body", "body": INTERNAL_ERROR + DONE, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # servers on ASGI 2.4 report a gone client by failing the send
            pass
        scope.cancel()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, or cancel it and raise `ClientGone` if the client disconnects first.

    The request body must already be read: afterwards the only message left is `http.disconnect`.
    """
    task: asyncio.Future[Any] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone()
    return task.result()
