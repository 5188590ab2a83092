"""The uvicorn server of `specserve serve`: uvicorn's own limits (concurrency, keep-alive), plus the
two it lacks: a deadline on each request's head, and a graceful shutdown that ends open streams
properly at a deadline.

uvicorn times out idle keep-alive connections only after a response, and its timer stops at the
first byte received, so a client that connects (or sends part of a request line) and stalls holds
the connection for ever: 1,000 such clients hold 1,000 sockets. `H11HeadTimeout` closes a
connection whose request head is not complete `header_timeout_s` after it began. The body's own
deadline is the app's (`BodyLimit`), which can still answer 408.

On SIGTERM uvicorn stops accepting, waits for running requests and, past `timeout_graceful_shutdown`,
cancels them, which cuts streams without an error event or `[DONE]`. `GracefulServer` runs the app's
`drain(shutdown_timeout_s)` alongside: sequences finish until the deadline, then the scheduler stops
and each open stream ends with an error event and `[DONE]`; uvicorn's own timeout stays as a
backstop `SHUTDOWN_FLUSH_S` later (for a client that stopped reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ListenSettings

SHUTDOWN_FLUSH_S = 3.0  # after the drain deadline: time for the last error events to be written


class H11HeadTimeout(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (see the module docstring)."""

    header_timeout_s: float = 10.0  # set by `head_timeout_protocol`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm()  # part of a head: its deadline runs from its first byte, not its last
        else:
            self._disarm()  # the head is complete; the body's deadline is the app's

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # still no whole head
            self.conn.send(h11.ConnectionClosed())  # as uvicorn's own keep-alive timeout closes
            self.transport.close()


def head_timeout_protocol(seconds: float) -> type[H11HeadTimeout]:
    """The protocol class for uvicorn's `http=` option, with this head deadline."""
    return type("H11HeadTimeout", (H11HeadTimeout,), {"header_timeout_s": seconds})


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose shutdown drains the app first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        draining = asyncio.ensure_future(self._drain())
        await super().shutdown(sockets)  # closes the listeners, then waits for running requests
        if self.force_exit:  # a second Ctrl-C: leave now (the worker is a daemon thread)
            draining.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await draining


def build_server(app: Any, listen: ListenSettings) -> GracefulServer:
    """The server for `app` (a `create_app` app) with `listen`'s address, limits and deadlines."""
    config = uvicorn.Config(
        # logging is set up by `logs.configure`; each request's line is `logs.AccessLog`'s, not uvicorn's
        app, host=listen.host, port=listen.port, log_level=listen.log_level, log_config=None, access_log=False,
        http=head_timeout_protocol(listen.header_timeout_s),
        limit_concurrency=listen.limit_concurrency,
        timeout_keep_alive=listen.keep_alive_timeout_s,
        timeout_graceful_shutdown=math.ceil(listen.shutdown_timeout_s + SHUTDOWN_FLUSH_S),
    )
    return GracefulServer(config, lambda: app.state.specserve.drain(listen.shutdown_timeout_s))
