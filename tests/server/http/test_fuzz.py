"""Fuzzing the request schema over a real socket: hypothesis builds request bodies (half valid,
half with boundary values and arbitrary JSON in any field, plus raw bytes); whatever arrives, the
server answers below 500 in a schema-valid shape, and it is still serving at the end. A field given
a value of the wrong JSON type is a 400 naming that field (nothing is coerced)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

# Small limits keep each generation to a few tokens, so many examples fit in a few seconds.
SETTINGS = ServerSettings(max_n=3, max_tokens_limit=8, default_max_tokens=4, max_body_bytes=256 * 1024)
FUZZ = settings(max_examples=70, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
URLS = st.sampled_from([_png(), "data:image/png;base64,AAAA", "data:,x", "", "http://127.0.0.1:9/a.png",
                        "data:text/plain;base64,aGk="])
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "nobody"])


def request_strategies(wild: bool) -> tuple:
    """(chat, completion) body strategies: valid values; `wild` adds boundary cases just outside
    the limits and arbitrary JSON in every field."""
    def f(good):
        return good | JSON if wild else good

    def edge(*values):  # boundary cases, only in the wild half
        return st.sampled_from(values) if wild else st.nothing()

    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": URLS})}),
    )
    roles = ROLES if wild else st.sampled_from(["system", "developer", "user", "assistant"])
    message = st.fixed_dictionaries({"role": f(roles), "content": f(st.text(max_size=40) | st.lists(
        f(part), max_size=3))})
    int64 = st.integers(-(2**63), 2**63 - 1)
    sampling = {
        "max_tokens": f(st.integers(1, 8) | edge(0, 9)), "temperature": f(st.floats(0, 2) | edge(-0.1, 2.1)),
        "top_p": f(st.floats(0.01, 1) | edge(0.0, 1.01)), "top_k": f(st.integers(-1, 50) | edge(-2)),
        "n": f(st.integers(1, 3) | edge(0, 4)), "seed": f(int64 | edge(2**63, -(2**63) - 1)),
        "ignore_eos": f(st.booleans()),
        "stop": f(st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4)
                  | edge("", [""])),
        "stream": f(st.booleans()), "stream_options": f(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "frequency_penalty": JSON, "unknown_field": JSON,
    }
    chat = st.fixed_dictionaries({"messages": f(st.lists(message, min_size=1, max_size=3))}, optional={
        **sampling, "max_completion_tokens": f(st.integers(1, 8) | edge(0, 9)),
        "logprobs": f(st.booleans()), "top_logprobs": f(st.integers(0, 5) | edge(-1, 21)),
    })
    prompt = (st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 300), min_size=1, max_size=6)
              | st.lists(st.text(min_size=1, max_size=10), max_size=3) | edge("", [], [-1], [10**6]))
    completion = st.fixed_dictionaries({"prompt": f(prompt)}, optional={
        **sampling, "logprobs": f(st.integers(0, 5) | edge(-1, 21)), "echo": f(st.just(False) | edge(True))})
    return chat, completion


_PLAIN, _WILD = request_strategies(False), request_strategies(True)
CHAT = _PLAIN[0] | _WILD[0]
COMPLETION = _PLAIN[1] | _WILD[1]


@pytest.fixture(scope="module")
def server(launch, make_engine):
    with launch(create_app(make_engine(), SETTINGS)) as running:
        with running.http(timeout=30) as http:
            running.client = http  # one keep-alive connection for all examples
            yield running


def post_json(server, path: str, body: dict):
    # Python's encoder writes inf/NaN as Infinity/NaN: not JSON, but clients send it, so fuzz it too.
    content = json.dumps(body, allow_nan=True).encode()
    return server.client.post(path, content=content, headers={"content-type": "application/json"})


def check(response, openai_schema, sse_payloads, kind: str) -> None:
    """Below 500, and shaped as OpenAI's schemas say."""
    assert response.status_code < 500, response.text
    # --hypothesis-show-statistics shows how often each status (and refused field) came up
    param = response.json()["error"]["param"] if response.status_code == 400 else ""
    event(f"{kind} {response.status_code} {param}")
    if response.status_code != 200:
        openai_schema("ErrorResponse", response.json())
        return
    if not response.headers["content-type"].startswith("text/event-stream"):
        openai_schema(f"Create{kind}Response", response.json())
        return
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    for payload in payloads[:-1]:
        chunk = json.loads(payload)
        if "error" in chunk:
            openai_schema("ErrorResponse", chunk)
        elif kind == "ChatCompletion":
            openai_schema("CreateChatCompletionStreamResponse", chunk)
        else:
            # The spec has no chunk schema for legacy completions; OpenAI streams them as
            # completion objects whose finish_reason stays null until the last chunk.
            for choice in chunk["choices"]:
                if choice["finish_reason"] is None:
                    choice["finish_reason"] = "length"
            openai_schema("CreateCompletionResponse", chunk)


@FUZZ
@given(body=CHAT)
def test_fuzz_chat_completions(server, openai_schema, sse_payloads, body):
    response = post_json(server, "/v1/chat/completions", body)
    check(response, openai_schema, sse_payloads, "ChatCompletion")


@FUZZ
@given(body=COMPLETION)
def test_fuzz_completions(server, openai_schema, sse_payloads, body):
    response = post_json(server, "/v1/completions", body)
    check(response, openai_schema, sse_payloads, "Completion")


# A known field and a JSON value of another type: integers (also a float of integral value, or a
# boolean) are not booleans, booleans are not numbers, strings are neither.
NOT_INT = st.booleans() | st.floats(allow_nan=False) | st.text(max_size=5) | st.lists(
    st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
NOT_BOOL = st.integers() | st.floats(allow_nan=False) | st.text(max_size=5) | st.lists(st.booleans(), max_size=2)
NOT_NUMBER = st.booleans() | st.text(max_size=5) | st.lists(st.floats(allow_nan=False), max_size=2)
TYPED_FIELDS = {
    "max_tokens": NOT_INT, "max_completion_tokens": NOT_INT, "n": NOT_INT, "seed": NOT_INT, "top_k": NOT_INT,
    "top_logprobs": NOT_INT, "stream": NOT_BOOL, "logprobs": NOT_BOOL, "ignore_eos": NOT_BOOL,
    "temperature": NOT_NUMBER, "top_p": NOT_NUMBER,
}


@FUZZ
@given(field_and_value=st.sampled_from(sorted(TYPED_FIELDS)).flatmap(
    lambda name: st.tuples(st.just(name), TYPED_FIELDS[name])))
def test_fuzz_wrong_json_types_are_400_naming_the_field(server, openai_schema, field_and_value):
    name, value = field_and_value
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, name: value}
    response = post_json(server, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    openai_schema("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == name


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzz_raw_bodies(server, openai_schema, raw):
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = server.client.post(path, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400
        openai_schema("ErrorResponse", response.json())


def test_still_serving_after_the_fuzz(server):
    assert server.client.get("/health").status_code == 200
    ok = server.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200
    for status in ("500", "503"):
        assert server.metric("specserve:http_requests_total", endpoint="/v1/chat/completions", status=status) == 0
    assert server.state.scheduler.num_running == 0
