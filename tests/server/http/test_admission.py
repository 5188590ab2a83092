"""Admission and preparation, regressions of findings 2 and 7 of issue 14: a prompt's text is limited
on arrival (a 20 MB prompt held the worker 9.5 s); images and tokenizing run in the prepare pool, so
a slow preparation never holds the engine's worker; a full queue answers 429 before any heavy work;
Retry-After follows the queue's drain rate (it was always 1 s while the queue took 27 s to drain)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from contextlib import ExitStack

import pytest
from PIL import Image

from specserve.server.http import images
from specserve.server.http.admission import MAX_RETRY_AFTER_S, RATE_SAMPLES, Admission, DrainRate
from specserve.server.http.app import create_app
from specserve.server.http.errors import APIError
from specserve.server.http.prepare import PreparePool
from specserve.server.http.settings import ServerSettings

STEP_DELAY = 0.02
SLOW = "SLOW"  # a chat with this word takes PREPARE_DELAY to prepare
PREPARE_DELAY = 1.5


# ---- admission and the drain rate, on their own ----------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Counts:
    """What `Admission` reads of the scheduler."""

    num_running = 0
    num_waiting = 0


def admission(running=0, waiting=0, capacity=4, min_retry=1):
    clock, counts = Clock(), Counts()
    counts.num_running, counts.num_waiting = running, waiting
    rate = DrainRate(clock)
    return Admission(counts, capacity, min_retry, rate), rate, clock, counts


def test_hold_admits_until_the_system_is_full_and_releases_on_exit():
    adm, *_ = admission(running=2, waiting=1, capacity=4)
    with adm.hold(1):
        assert adm.held == 1
        with pytest.raises(APIError) as info, adm.hold(1):
            pass
        assert info.value.status == 429 and info.value.code == "queue_full"
        assert "Retry-After" in info.value.headers
    assert adm.held == 0
    with pytest.raises(RuntimeError), adm.hold(3):  # a request that fails in preparation lets go too
        raise RuntimeError("tokenizer failed")
    assert adm.held == 0


def test_retry_after_is_the_backlog_over_the_recent_drain_rate():
    adm, rate, clock, counts = admission(waiting=27, min_retry=1)
    for t in range(1, 11):  # one sequence finished per second for 10 s
        rate.add(float(t))
    clock.now = 10.0
    assert rate.per_second() == pytest.approx(1.0)
    assert adm.retry_after(1) == 28  # 27 waiting + this request's 1, at 1 per second
    counts.num_waiting = 0
    assert adm.retry_after(1) == 1
    counts.num_waiting = 1000
    assert adm.retry_after(1) == MAX_RETRY_AFTER_S


def test_retry_after_uses_the_last_finishes_and_falls_when_draining_stops():
    adm, rate, clock, counts = admission(waiting=7, min_retry=2)
    for i in range(RATE_SAMPLES):  # a burst: 4 per second over the last 8 s
        rate.add(100.0 + i / 4)
    clock.now = 100.0 + RATE_SAMPLES / 4
    assert rate.per_second() == pytest.approx(4.0)
    assert adm.retry_after(1) == 2  # 8 / 4 per second
    clock.now += 1000.0  # nothing finished since: the estimate goes to the top of its range
    assert rate.per_second() == 0.0
    assert adm.retry_after(1) == MAX_RETRY_AFTER_S


def test_a_cancelled_request_keeps_its_hold_until_its_running_job_ends():
    async def scenario():
        pool, started, release = PreparePool(1), threading.Event(), threading.Event()
        adm, *_ = admission(capacity=4)
        ran = []

        async def request(fn):
            with adm.hold(2):
                return await pool.run(fn)

        def blocking():
            started.set()
            release.wait(10)

        running = asyncio.ensure_future(request(blocking))
        queued = asyncio.ensure_future(pool.run(ran.append, "queued job"))
        await asyncio.to_thread(started.wait, 10)
        running.cancel()
        queued.cancel()
        await asyncio.sleep(0.1)
        assert not running.done() and adm.held == 2  # the thread still works for the gone client
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert adm.held == 0
        await asyncio.sleep(0.1)
        assert ran == []  # a job still queued when its request left never runs
        pool.shutdown()

    asyncio.run(scenario())


# ---- over a socket ---------------------------------------------------------------------------
class SlowEngine:
    """The real engine with slow steps and, for SLOW chats, a slow preparation; records where and how
    often prompts were prepared."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.prepared: list[str] = []  # the thread of each preparation

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prepare_chat(self, messages, tools=None):
        self.prepared.append(threading.current_thread().name)
        if SLOW in str(messages):
            time.sleep(PREPARE_DELAY)
        return self._engine.prepare_chat(messages, tools)

    def prepare_text(self, prompt):
        self.prepared.append(threading.current_thread().name)
        return self._engine.prepare_text(prompt)

    def step_batch(self, seqs):
        time.sleep(STEP_DELAY)
        return self._engine.step_batch(seqs)


@pytest.fixture(scope="module")
def slow(make_engine):
    return SlowEngine(make_engine("llava", draft="none"))


@pytest.fixture(scope="module")
def server(launch, slow):
    settings = ServerSettings(max_active=2, max_queue=1, max_body_bytes=24 * 2**20)
    with launch(create_app(slow, settings)) as running:
        yield running


def chat(text: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": text}], "temperature": 0, "ignore_eos": True,
            "max_tokens": 4, **fields}


def test_a_20_mb_prompt_is_refused_on_arrival_without_tokenizing(server, slow, openai_schema):
    prepared = len(slow.prepared)
    huge = "lorem ipsum " * (20 * 2**20 // 12)
    with server.http() as http:
        started = time.monotonic()
        refused_chat = http.post("/v1/chat/completions", json=chat(huge))
        refused_text = http.post("/v1/completions", json={"prompt": ["hi", huge]})
        elapsed = time.monotonic() - started
    for response, param in ((refused_chat, "messages"), (refused_text, "prompt")):
        assert response.status_code == 400, response.text
        openai_schema("ErrorResponse", response.json())
        assert response.json()["error"]["param"] == param
        assert f"at most {16 * 512}" in response.json()["error"]["message"]  # 16 x the tiny context
    assert len(slow.prepared) == prepared  # the tokenizer never saw them
    assert elapsed < 5.0


def test_a_slow_preparation_does_not_hold_other_sequences_steps(server, slow):
    """A stream's chunks keep coming while another request spends 1.5 s in its chat template; it
    ran on a prepare thread, not on the engine's worker."""
    gaps: list[float] = []
    with server.http() as http, http.stream("POST", "/v1/chat/completions",
                                            json=chat("hello", max_tokens=100, stream=True)) as stream:
        lines = stream.iter_lines()
        next(lines)
        slow_request = threading.Thread(target=lambda: server.http().post(
            "/v1/chat/completions", json=chat(f"{SLOW} hello")))
        slow_request.start()
        last = time.monotonic()
        for line in lines:
            if line.startswith("data: "):
                gaps.append(time.monotonic() - last)
                last = time.monotonic()
        slow_request.join()
    assert slow.prepared[-1].startswith("specserve-prepare")
    assert sum(gaps) > PREPARE_DELAY  # the stream outlived the slow preparation ...
    assert max(gaps) < PREPARE_DELAY / 3  # ... and never paused for it


def png_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def raw_post(server, path: str, body: dict) -> socket.socket:
    """Send a request and leave its answer unread; closing the socket is the client leaving."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_full_queue_refuses_before_decoding_images_or_tokenizing(server, slow, monkeypatch, openai_schema):
    decoded = []
    monkeypatch.setattr(images, "decode_data_url", lambda *args: decoded.append(args))
    scheduler = server.state.scheduler
    with ExitStack() as clients:
        for _ in range(3):  # 2 running + 1 waiting: the system is full
            sock = raw_post(server, "/v1/chat/completions", chat("long", max_tokens=300, stream=True))
            clients.callback(sock.close)
        deadline = time.monotonic() + 5
        while (scheduler.num_running, scheduler.num_waiting) != (2, 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        prepared = len(slow.prepared)
        image_chat = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_url()}}, {"type": "text", "text": "?"}]}]}
        with server.http() as http:
            refused = http.post("/v1/chat/completions", json=image_chat)
            refused_text = http.post("/v1/completions", json={"prompt": "hello"})
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:  # a body never sent
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 429")  # answered without waiting for it
    assert refused.status_code == 429 and refused_text.status_code == 429
    openai_schema("ErrorResponse", refused.json())
    assert 1 <= int(refused.headers["retry-after"]) <= MAX_RETRY_AFTER_S
    assert decoded == [] and len(slow.prepared) == prepared  # no image decoded, nothing tokenized
