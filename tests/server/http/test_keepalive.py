"""Streams whose first token is slow (a long prefill, a queue wait): headers go out after
`sse_keepalive_s`, then `: ping` comments until the token, so idle-timeout proxies keep the
connection; the official client reads through them; a failure after the headers is an error event,
and one before them is still a plain HTTP error."""

from __future__ import annotations

import time

import openai
import pytest

from specserve.server.engine.errors import RequestError
from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

KEEPALIVE_S = 0.2
SLOW_START_S = 0.9
SLOW, FAIL_LATE, FAIL_EARLY = "slowstart", "failslow", "failfast"


class SlowStart:
    """The real engine, whose start (the prefill) takes `SLOW_START_S` for prompts with a marker
    word, and fails late or at once for others."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def start(self, prompt, params):
        text = self._engine.tokenizer.decode(prompt.token_ids)
        if SLOW in text or FAIL_LATE in text:
            time.sleep(SLOW_START_S)
        if FAIL_LATE in text or FAIL_EARLY in text:
            raise RequestError("this prompt cannot be served", param="messages")
        return self._engine.start(prompt, params)


@pytest.fixture(scope="module")
def server(launch, make_engine):
    settings = ServerSettings(served_model_name="tiny", sse_keepalive_s=KEEPALIVE_S)
    with launch(create_app(SlowStart(make_engine(draft="none")), settings)) as running:
        yield running


def chat(text: str) -> dict:
    # greedy: a sampled answer could be one EOS with no text
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 4, "stream": True,
            "temperature": 0}


def test_a_slow_first_token_gets_headers_at_once_then_pings(server):
    with server.http() as client:
        started = time.monotonic()
        with client.stream("POST", "/v1/chat/completions", json=chat(f"{SLOW} please")) as response:
            headers_after = time.monotonic() - started
            blocks = response.read().decode().split("\n\n")
    assert response.status_code == 200 and headers_after < SLOW_START_S - KEEPALIVE_S
    pings = [b for b in blocks if b == ": ping"]
    data = [b for b in blocks if b.startswith("data: ")]
    assert len(pings) >= 3  # about SLOW_START_S / KEEPALIVE_S of them
    assert blocks.index(data[0]) > blocks.index(pings[-1])  # every ping comes before the first token
    assert data[-1] == "data: [DONE]" and len(data) >= 3


def test_the_official_client_reads_through_the_pings(server):
    chunks = list(server.openai().chat.completions.create(**chat(f"{SLOW} please"), extra_body={"ignore_eos": True},
                                                          stream_options={"include_usage": True}))
    # the tokens arrived after the comments: all four, and the finishing chunk
    assert chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_a_failure_after_the_headers_is_an_error_event(server):
    with server.http() as client:
        with client.stream("POST", "/v1/chat/completions", json=chat(f"{FAIL_LATE} please")) as response:
            blocks = [b for b in response.read().decode().split("\n\n") if b]
    assert response.status_code == 200 and blocks[0] == ": ping"
    assert blocks[-2].startswith('data: {"error"') and "cannot be served" in blocks[-2]
    assert blocks[-1] == "data: [DONE]"


def test_a_failure_before_the_headers_keeps_its_http_status(server):
    with server.http() as client:
        response = client.post("/v1/chat/completions", json=chat(f"{FAIL_EARLY} please"))
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        list(server.openai().chat.completions.create(**chat(f"{FAIL_EARLY} please")))


def test_a_fast_stream_has_no_pings(server):
    with server.http() as client:
        with client.stream("POST", "/v1/chat/completions", json=chat("hello")) as response:
            blocks = [b for b in response.read().decode().split("\n\n") if b]
    assert blocks and all(b.startswith("data: ") for b in blocks)
