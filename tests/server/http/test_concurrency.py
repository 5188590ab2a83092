"""Many clients, slow steps: fairness, the bounded queue (429), disconnects freeing their sequences,
an engine failure staying inside one request, and 503 while the model loads.

The engine is the real one on the tiny model, wrapped to pause in every step (so a test can act
mid-generation), to count releases, and to fail on demand."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

STEP_DELAY = 0.02
EXPLODE = "EXPLODE"  # a prompt with this word makes the wrapped engine fail after its first step


class SlowEngine:
    """The real engine, slower, countable and breakable."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.released = 0
        self.steps: list[int] = []  # max_tokens of each stepped sequence, in order (names requests)
        self._doomed: set[int] = set()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def start(self, prompt, params):
        seq = self._engine.start(prompt, params)
        if EXPLODE in self._engine.tokenizer.decode(prompt.token_ids):
            self._doomed.add(id(seq))
        return seq

    def step_batch(self, seqs):
        """One slow batched step; a doomed sequence fails in its own place, as the engine reports
        a sequence's own failure."""
        time.sleep(STEP_DELAY)
        doomed = [id(seq) in self._doomed and bool(seq.output_ids) for seq in seqs]
        live = [seq for seq, bad in zip(seqs, doomed) if not bad]
        self.steps += [seq.params.max_tokens for seq in live]
        outs = iter(self._engine.step_batch(live) if live else [])
        return [RuntimeError("simulated engine bug") if bad else next(outs) for bad in doomed]

    def release(self, seq):
        self.released += 1
        self._doomed.discard(id(seq))
        self._engine.release(seq)


@pytest.fixture(scope="module")
def slow(make_engine):
    return SlowEngine(make_engine(draft="none"))  # one token per step: predictable timing


@pytest.fixture(scope="module")
def server(launch, slow):
    settings = ServerSettings(max_active=2, max_queue=2, retry_after_s=3)
    with launch(create_app(slow, settings)) as running:
        yield running


def body(server, text="hello", max_tokens=8, **extra) -> dict:
    return {"model": server.state.model_name, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


def wait_for(condition, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_disconnect_mid_stream_releases_the_sequence(server, slow):
    released = slow.released
    with server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body(server, max_tokens=400, stream=True)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert server.state.scheduler.num_running == 1
        # leaving the block closes the connection mid-stream
    assert wait_for(lambda: slow.released == released + 1, timeout=2)
    assert server.state.scheduler.num_running == 0
    assert server.metric("vllm:num_requests_running", model_name=server.state.model_name) == 0
    assert server.metric("specserve:request_aborted_total", model_name=server.state.model_name,
                         reason="abort") >= 1


def test_disconnect_while_waiting_for_a_json_response_releases_it(server, slow):
    released = slow.released
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body(server, max_tokens=400), timeout=0.3)
    assert wait_for(lambda: slow.released == released + 1, timeout=2)
    assert server.state.scheduler.num_running == 0


def test_short_request_is_not_blocked_by_a_long_one(server, slow):
    long_done = threading.Event()

    def long_request():
        with server.http() as http:
            http.post("/v1/chat/completions", json=body(server, max_tokens=60))
        long_done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    try:
        assert wait_for(lambda: server.state.scheduler.num_running == 1)
        first = len(slow.steps)
        with server.http() as http:
            short = http.post("/v1/chat/completions", json=body(server, max_tokens=4))
        assert short.status_code == 200
        assert not long_done.is_set()
        # batched turns: while the short request ran, the long one got one step per turn beside it
        steps = slow.steps[first:]
        short_span = steps[steps.index(4): len(steps) - steps[::-1].index(4)]
        assert short_span.count(4) == 4 and short_span.count(60) <= 4
    finally:
        thread.join()


def test_full_queue_answers_429_with_retry_after(server, openai_schema):
    threads = [threading.Thread(target=lambda: httpx.post(
        f"{server.url}/v1/chat/completions", json=body(server, max_tokens=12), timeout=30)) for _ in range(4)]
    for t in threads:
        t.start()
    scheduler = server.state.scheduler
    try:
        assert wait_for(lambda: scheduler.num_running == 2 and scheduler.num_waiting == 2)
        with server.http() as http:
            refused = http.post("/v1/chat/completions", json=body(server))
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 3  # the configured least; more if drains are slow
        openai_schema("ErrorResponse", refused.json())
        assert refused.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            server.openai().chat.completions.create(
                model=server.state.model_name, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    finally:
        for t in threads:
            t.join()
    assert scheduler.num_running == 0 and scheduler.num_waiting == 0


def test_engine_failure_mid_stream_is_an_error_event(server, sse_payloads, openai_schema):
    with server.http() as http:
        with http.stream("POST", "/v1/chat/completions",
                         json=body(server, text=f"{EXPLODE} now", max_tokens=20, stream=True)) as r:
            assert r.status_code == 200
            payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    openai_schema("ErrorResponse", error)
    assert error["error"]["type"] == "server_error"
    assert "RuntimeError" not in payloads[-2]
    openai_schema("CreateChatCompletionStreamResponse", json.loads(payloads[0]))
    with pytest.raises(openai.APIError):
        for _ in server.openai().chat.completions.create(
                model=server.state.model_name, messages=[{"role": "user", "content": EXPLODE}],
                max_tokens=20, stream=True, extra_body={"ignore_eos": True}):
            pass


def test_engine_failure_fails_only_that_request(server, openai_schema):
    with server.http() as http:
        failed = http.post("/v1/chat/completions", json=body(server, text=EXPLODE, max_tokens=20))
        ok = http.post("/v1/chat/completions", json=body(server, max_tokens=3))
    assert failed.status_code == 500
    openai_schema("ErrorResponse", failed.json())
    assert "RuntimeError" not in failed.text  # the log has the class and traceback, the client not
    assert ok.status_code == 200
    assert server.state.scheduler.num_running == 0


def test_503_while_the_model_loads(launch, make_engine, openai_schema):
    gate = threading.Event()

    def factory():
        gate.wait(30)
        return make_engine()

    with launch(create_app(factory, ServerSettings())) as loading:
        with loading.http() as http:
            health = http.get("/health")
            assert health.status_code == 503
            openai_schema("ErrorResponse", health.json())
            chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert chat.status_code == 503 and "loading" in chat.json()["error"]["message"]
            assert http.get("/metrics").status_code == 200  # scrapes work meanwhile
            gate.set()
            assert wait_for(lambda: http.get("/health").status_code == 200, timeout=30)
            ok = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 2})
            assert ok.status_code == 200


def test_failed_load_is_reported_without_its_details(launch, openai_schema, caplog):
    """/health says the load failed; the reason (which names files) is in the log only."""
    def factory():
        raise FileNotFoundError("no such model folder: /home/someone/models/secret-model")

    with caplog.at_level("ERROR"), launch(create_app(factory, ServerSettings())) as broken:
        with broken.http() as http:
            assert wait_for(lambda: "failed to load" in http.get("/health").text)
            health = http.get("/health")
    assert health.status_code == 503
    openai_schema("ErrorResponse", health.json())
    assert "/home/someone" not in health.text and "FileNotFoundError" not in health.text
    assert "/home/someone/models/secret-model" in caplog.text
