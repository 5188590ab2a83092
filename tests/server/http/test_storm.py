"""Hostile clients under load, against `specserve serve`'s server (slow: `python -m pytest -m slow
tests/server/http`): no 5xx, no hang past a bound, memory back within a bound after a storm, and a
well-formed request served within a bound while hostile ones run. The issue-14 findings again, all
at once: huge prompts, long thin PNGs, stalled heads and bodies, garbage, disconnects."""

from __future__ import annotations

import base64
import io
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable

import httpx
import psutil
import pytest
from PIL import Image

from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig
from specserve.server.http.app import create_app
from specserve.server.http.settings import ListenSettings, ServerSettings
from specserve.server.http.transport import build_server
from specserve.server.store.pull import pull

pytestmark = pytest.mark.slow

LISTEN = ListenSettings(log_level="warning", header_timeout_s=2, shutdown_timeout_s=1)
SETTINGS = ServerSettings(max_active=4, max_queue=16, max_body_bytes=24 * 2**20, body_timeout_s=2)
HUGE = "lorem ipsum " * (20 * 2**20 // 12)  # 20 MB of prompt


def png_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_chat(url: str, max_tokens: int = 4) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]}],
        "max_tokens": max_tokens, "temperature": 0}


WELL_FORMED = image_chat(png_url(48, 32))


def rss() -> int:
    return psutil.Process().memory_info().rss


def latency(url: str, body: dict = WELL_FORMED) -> float:
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


class Hostiles:
    """Threads that each repeat one hostile act until stopped; every HTTP status they saw is kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def add(self, act: Callable[[], int | None]) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                status = act()
                if status is not None:
                    self.statuses.append(status)

        self._threads.append(threading.Thread(target=loop, daemon=True))

    def __enter__(self) -> Hostiles:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "a hostile request hung"

    def post(self, path: str, body: dict | bytes, content_type: str = "application/json") -> Callable[[], int]:
        # encoded once: the clients share this process's cores with the server
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": content_type}
        return lambda: httpx.post(f"{self.url}{path}", content=data, headers=headers, timeout=30).status_code

    def stall(self, prefix: bytes, seconds: float) -> Callable[[], None]:
        host, port = self.url.removeprefix("http://").split(":")

        def act() -> None:
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(prefix)
                sock.settimeout(seconds)
                try:
                    while sock.recv(65536):
                        pass
                except (TimeoutError, OSError):
                    pass

        return act


def add_hostile_acts(hostiles: Hostiles) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    chat = "/v1/chat/completions"
    for _ in range(2):
        hostiles.add(hostiles.post(chat, {"messages": [{"role": "user", "content": HUGE}]}))
    hostiles.add(hostiles.post("/v1/completions", {"prompt": HUGE}))
    hostiles.add(hostiles.post(chat, image_chat(png_url(100_000, 1))))
    hostiles.add(hostiles.post(chat, image_chat(png_url(1_000_000, 1))))
    hostiles.add(hostiles.post(chat, {"messages": [{"role": "user", "content": "x"}], "top_k": 2**64}))
    hostiles.add(hostiles.post(chat, b"[" * 100_000))
    hostiles.add(hostiles.post(chat, b"hello", "text/plain"))
    for _ in range(10):
        hostiles.add(hostiles.stall(b"POST /v1/chat", 5))
    for _ in range(3):
        hostiles.add(hostiles.stall(head + b"Content-Length: 500\r\n\r\n{", 5))


@pytest.fixture(scope="module")
def server(launch, make_engine):
    app = create_app(make_engine("llava", draft="none"), SETTINGS)
    with launch(app, build_server(app, LISTEN)) as running:
        yield running


def test_well_formed_requests_are_not_delayed_by_hostile_ones(server):
    baseline = statistics.median(latency(server.url) for _ in range(5))
    hostiles = Hostiles(server.url)
    add_hostile_acts(hostiles)
    with hostiles:
        time.sleep(1.0)  # let the hostile load build up
        under_attack = [latency(server.url) for _ in range(10)]
    assert max(under_attack) < 3 * baseline + 2.0, (baseline, under_attack)
    assert hostiles.statuses and max(hostiles.statuses) < 500, sorted(set(hostiles.statuses))


def test_memory_returns_within_a_bound_after_a_storm(server):
    latency(server.url)
    before = rss()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(40):  # disconnect storm: streams dropped after their first chunk
            body = {**image_chat(png_url(64, 64), max_tokens=300), "stream": True, "ignore_eos": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as stream:
                next(stream.iter_lines())
        for i in range(200):
            assert http.post("/v1/completions", json={"prompt": f"request {i}", "max_tokens": 3}).status_code == 200
    hostiles = Hostiles(server.url)
    add_hostile_acts(hostiles)
    with hostiles:
        time.sleep(5.0)
    scheduler = server.state.scheduler
    deadline = time.monotonic() + 10
    while scheduler.num_running + scheduler.num_waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.num_running == scheduler.num_waiting == 0
    assert rss() - before < 300 * 2**20, f"grew {(rss() - before) / 2**20:.0f} MiB"
    assert latency(server.url) < 2.0


@pytest.fixture(scope="module")
def tiny_vlm_server(launch, store_cache, smollm2_dir):
    folder = pull("tiny-vlm", store_cache, progress=False)
    app = create_app(Engine.from_config(EngineConfig(str(folder), draft="none")), SETTINGS)
    with launch(app, build_server(app, LISTEN)) as running:
        yield running


def test_long_thin_pngs_on_tiny_vlm_cost_no_memory_and_no_one_time(tiny_vlm_server):
    """The finding as probed: tiny-vlm, a 100000x1 and a 1000000x1 PNG beside a small request."""
    url = tiny_vlm_server.url
    baseline = latency(url)
    before = rss()
    hostiles = Hostiles(url)
    for width in (100_000, 1_000_000):
        hostiles.add(hostiles.post("/v1/chat/completions", image_chat(png_url(width, 1))))
    with hostiles:
        time.sleep(0.5)
        beside = [latency(url) for _ in range(3)]
    assert set(hostiles.statuses) == {400}
    assert max(beside) < 3 * baseline + 1.0, (baseline, beside)
    assert rss() - before < 200 * 2**20
