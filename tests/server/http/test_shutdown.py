"""Graceful shutdown with a deadline (finding 4 of issue 14: SIGTERM waited for every running
generation, and a forced exit cut streams with no error event and no `[DONE]`). With 8 streams in
flight: new requests are refused, what finishes before the deadline finishes normally, then every
open stream ends with an OpenAI-shaped error event and `[DONE]`, every sequence's KV memory is
released, and `specserve serve` exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from specserve.server.http.app import create_app
from specserve.server.http.settings import ListenSettings, ServerSettings
from specserve.server.http.transport import build_server

STEP_DELAY = 0.02
DEADLINE = 1.0
STREAMS = 8


class CountingEngine:
    """The real engine, slower, counting the sequences it starts and releases."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.started = self.released = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def start(self, prompt, params):
        seq = self._engine.start(prompt, params)
        self.started += 1
        return seq

    def step_batch(self, seqs):
        time.sleep(STEP_DELAY)
        return self._engine.step_batch(seqs)

    def release(self, seq):
        self.released += 1
        self._engine.release(seq)


def stream_payloads(url: str, max_tokens: int, out: list, first: threading.Event) -> None:
    """Stream one chat completion; its `data:` payloads go to `out`, `first` is set at the first."""
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                out.append(line[len("data: "):])
                first.set()


def check_cut_stream(payloads: list[str], openai_schema) -> None:
    """Chunks, then an error event, then `[DONE]`."""
    assert payloads[-1] == "[DONE]", payloads[-3:]
    error = json.loads(payloads[-2])
    openai_schema("ErrorResponse", error)
    assert error["error"]["type"] == "server_error"
    for chunk in payloads[:-2]:
        openai_schema("CreateChatCompletionStreamResponse", json.loads(chunk))


def test_shutdown_lets_sequences_run_until_the_deadline_then_ends_streams(launch, make_engine, openai_schema):
    engine = CountingEngine(make_engine(draft="none", max_num_seqs=STREAMS + 1))  # a KV slot for each stream
    app = create_app(engine, ServerSettings(max_active=STREAMS + 1))
    server = build_server(app, ListenSettings(log_level="warning", shutdown_timeout_s=DEADLINE))
    outputs = [[] for _ in range(STREAMS + 1)]
    firsts = [threading.Event() for _ in outputs]
    with launch(app, server) as running:
        tokens = [400] * STREAMS + [2]  # eight long streams and one that ends before the deadline
        clients = [threading.Thread(target=stream_payloads, args=(running.url, n, out, first))
                   for n, out, first in zip(tokens, outputs, firsts)]
        for client in clients:
            client.start()
        assert all(first.wait(10) for first in firsts)
        server.should_exit = True  # what SIGTERM does
        stopping = time.monotonic()
        time.sleep(0.3)
        assert running.state.draining
        with pytest.raises(httpx.TransportError):  # the listener is closed: nothing new gets in
            httpx.get(f"{running.url}/health", timeout=2)
        for client in clients:
            client.join(DEADLINE + 10)
        elapsed = time.monotonic() - stopping
    assert DEADLINE <= elapsed < DEADLINE + 3
    for payloads in outputs[:STREAMS]:
        check_cut_stream(payloads, openai_schema)
    short = outputs[STREAMS]
    assert short[-1] == "[DONE]" and json.loads(short[-2])["choices"][0]["finish_reason"] == "length"
    assert engine.started == engine.released == STREAMS + 1  # every KV cache freed
    assert running.state.scheduler.num_running == running.state.scheduler.num_waiting == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # ~13 s, mostly the subprocess's imports and load; the test above runs the same drain
def test_sigterm_drains_and_exits_0(tiny_model_dir, tmp_path, openai_schema):
    """The command itself: SIGTERM with 8 streams in flight; each ends with an error event and
    `[DONE]` at the deadline, and the process exits 0 soon after."""
    port = free_port()
    command = [sys.executable, "-c", "import sys; from specserve.server.cli import main; sys.exit(main())",
               "serve", "--model", str(tiny_model_dir), "--draft", "none", "--port", str(port),
               "--shutdown-timeout", str(DEADLINE), "--log-level", "warning", "--threads", "1"]
    env = {**os.environ, "SPECSERVE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        outputs = [[] for _ in range(STREAMS)]
        firsts = [threading.Event() for _ in outputs]
        clients = [threading.Thread(target=stream_payloads, args=(url, 480, out, first))
                   for out, first in zip(outputs, firsts)]
        for client in clients:
            client.start()
        assert all(first.wait(30) for first in firsts)
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        for client in clients:
            client.join(DEADLINE + 10)
        code = proc.wait(DEADLINE + 10)
        elapsed = time.monotonic() - stopping
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert code == 0, stderr
    assert elapsed < DEADLINE + 5
    assert "Traceback" not in stderr
    for payloads in outputs:
        check_cut_stream(payloads, openai_schema)
