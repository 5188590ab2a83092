"""The event-stream response on its own: framing, `on_close` when the client leaves mid-stream,
and a clean error event when rendering fails after the headers went out."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
from fastapi import FastAPI

from specserve.server.http.sse import DONE, EventStream, sse_event


def test_one_event_is_one_data_line():
    event = sse_event({"text": "two\nlines", "emoji": "é"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert json.loads(event[6:]) == {"text": "two\nlines", "emoji": "é"}


def make_app(closed: threading.Event) -> FastAPI:
    app = FastAPI()

    async def endless():
        for i in range(10_000):
            yield sse_event({"i": i})
            await asyncio.sleep(0.01)

    async def broken():
        yield sse_event({"i": 0})
        raise RuntimeError("renderer bug")

    @app.get("/endless")
    async def endless_route():
        return EventStream(endless(), on_close=closed.set)

    @app.get("/broken")
    async def broken_route():
        return EventStream(broken(), on_close=closed.set)

    return app


def test_on_close_runs_when_the_client_leaves(launch):
    closed = threading.Event()
    with launch(make_app(closed)) as server, httpx.Client(base_url=server.url) as http:
        with http.stream("GET", "/endless") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in response.headers
            assert next(response.iter_lines()) == 'data: {"i":0}'
        started = time.monotonic()
        assert closed.wait(2)
        assert time.monotonic() - started < 2


def test_a_failure_mid_stream_ends_with_an_error_event(launch, sse_payloads, openai_schema):
    closed = threading.Event()
    with launch(make_app(closed)) as server, httpx.Client(base_url=server.url) as http:
        with http.stream("GET", "/broken") as response:
            payloads = sse_payloads(response)
    assert payloads[0] == '{"i":0}' and payloads[-1] == DONE.decode()[6:].strip()
    openai_schema("ErrorResponse", json.loads(payloads[1]))
    assert closed.is_set()
