"""Slow and numerous clients against `specserve serve`'s server (`transport.build_server`), over raw
sockets: a request head that stalls is closed after the header timeout, a body that stalls gets a
408 after the body timeout, idle keep-alive connections close, and past the concurrency limit new
requests get a fast 503; meanwhile well-formed clients are served. Regression of finding 5 of
issue 14: 1,000 connections that sent part of a request and stalled stayed open indefinitely."""

from __future__ import annotations

import json
import resource
import socket
import time
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from specserve.server.http.app import create_app
from specserve.server.http.settings import ListenSettings, ServerSettings
from specserve.server.http.transport import build_server

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
LISTEN = ListenSettings(log_level="warning", header_timeout_s=HEADER_TIMEOUT, keep_alive_timeout_s=1,
                       limit_concurrency=64, shutdown_timeout_s=1)


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(draft="none")


@contextmanager
def serving(launch, engine, listen: ListenSettings = LISTEN, body_timeout_s: float = BODY_TIMEOUT):
    app = create_app(engine, ServerSettings(body_timeout_s=body_timeout_s))
    with launch(app, build_server(app, listen)) as running:
        yield running


@pytest.fixture(scope="module")
def server(launch, engine):
    with serving(launch, engine) as running:
        yield running


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(10)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (whatever it sends first is read away)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if sock.recv(65536) == b"":
                return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True
    return False


def served_quickly(server) -> float:
    started = time.monotonic()
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=10, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert response.status_code == 200, response.text
    return time.monotonic() - started


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
STALLS = {
    "nothing sent": b"",
    "part of the request line": b"POST /v1/chat/comp",
    "headers without their end": HEAD,
}


def test_stalled_request_heads_are_closed_while_others_are_served(server):
    with ExitStack() as stack:
        stalled = []
        for prefix in STALLS.values():
            for _ in range(5):
                sock = stack.enter_context(connect(server))
                sock.sendall(prefix)
                stalled.append(sock)
        trickle = stack.enter_context(connect(server))  # one byte at a time: the deadline still holds
        assert served_quickly(server) < 1.0
        for byte in HEAD[: int(HEADER_TIMEOUT / 0.05) + 10]:
            try:
                trickle.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.05)
        assert closed_within(trickle, HEADER_TIMEOUT + 1)
        assert all(closed_within(sock, HEADER_TIMEOUT + 1) for sock in stalled)
    assert served_quickly(server) < 1.0


def test_a_stalled_body_is_a_408_and_the_connection_closes(server, openai_schema):
    with connect(server) as sock:
        sock.sendall(HEAD + b"Content-Length: 200\r\n\r\n" + b'{"messages": [')
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        elapsed = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert BODY_TIMEOUT * 0.8 < elapsed < BODY_TIMEOUT + 2
        body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        openai_schema("ErrorResponse", body)
        assert body["error"]["code"] == "request_timeout"
        assert closed_within(sock, 2)


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_within(sock, LISTEN.keep_alive_timeout_s + 1)


def test_past_the_concurrency_limit_requests_get_a_fast_503(launch, engine):
    listen = ListenSettings(log_level="warning", header_timeout_s=30, limit_concurrency=3)
    with serving(launch, engine, listen) as server, ExitStack() as stack:
        for _ in range(3):
            stack.enter_context(connect(server))
        time.sleep(0.2)  # the server has accepted them
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
        stack.close()
        time.sleep(0.2)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


@pytest.mark.slow
def test_a_thousand_slowloris_connections_are_closed_while_others_are_served(launch, engine):
    # both ends of every connection live in this process: make room for them below the hard limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = 1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * count + 512)), hard))
    listen = ListenSettings(log_level="warning", header_timeout_s=3, limit_concurrency=2 * count)
    try:
        # the served requests' bodies get the default body timeout: with 1,000 sockets to read, the event loop
        # can take longer than BODY_TIMEOUT between a well-formed request's head and its body
        with serving(launch, engine, listen, ServerSettings().body_timeout_s) as server, ExitStack() as stack:
            stalled = []
            for i in range(count):
                sock = stack.enter_context(connect(server))
                sock.sendall(list(STALLS.values())[i % len(STALLS)])
                stalled.append(sock)
            latencies = [served_quickly(server) for _ in range(5)]
            assert max(latencies) < 2.0
            deadline = time.monotonic() + listen.header_timeout_s + 5
            assert all(closed_within(sock, max(deadline - time.monotonic(), 0.01)) for sock in stalled)
            assert served_quickly(server) < 1.0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
