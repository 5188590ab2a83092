"""End to end over a real socket with the official `openai` client, on the tiny Llama with n-gram
drafting: HTTP output equals the engine's own greedy `generate`, stream equals non-stream, and every
body and chunk passes OpenAI's published schemas."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from specserve.server.engine.config import SamplingParams
from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

PROMPTS = ["the quick brown fox", "def add(a, b):", "Summarise: the cat sat on the mat."]
NO_EOS = {"ignore_eos": True}  # fixed lengths, whatever the random model says


@pytest.fixture(scope="module")
def server(launch, make_engine):
    # batch_tree_tokens=0: every proposal verified whole, so the spec_decode counts of two engines
    # agree (the default planner's cut follows each engine's own measured verify cost)
    with launch(create_app(make_engine(batch_tree_tokens=0), ServerSettings(max_n=4))) as running:
        yield running


@pytest.fixture(scope="module")
def reference(make_engine):
    """A second engine on the same weights, driven directly (the server's is on its worker)."""
    return make_engine(batch_tree_tokens=0)


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def greedy_reference(engine, text: str, max_tokens: int):
    return engine.generate(engine.prepare_chat(user(text)), SamplingParams(max_tokens=max_tokens))


def test_models_health_and_schema(server, client, openai_schema):
    listed = client.models.list().data
    assert [m.id for m in listed] == [server.state.model_name]
    with server.http() as http:
        body = http.get("/v1/models").json()
        assert http.get("/health").status_code == 200
        one = http.get(f"/v1/models/{listed[0].id}")
    openai_schema("ListModelsResponse", body)
    assert body["data"][0]["root"] and body["data"][0]["max_model_len"] == 512
    assert one.status_code == 200 and one.json()["id"] == listed[0].id


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_http_equals_engine_generate(client, server, reference, text, openai_schema):
    expected = greedy_reference(reference, text, 24)
    response = client.chat.completions.create(
        model=server.state.model_name, messages=user(text), max_tokens=24, temperature=0)
    openai_schema("CreateChatCompletionResponse", response.model_dump(mode="json", exclude_unset=True))
    choice = response.choices[0]
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.total_tokens == expected.prompt_tokens + len(expected.token_ids)
    spec = response.model_extra["spec_decode"]
    assert spec["verify_steps"] == expected.metrics.verify_steps
    assert spec["accepted_draft_tokens"] == expected.metrics.accepted_draft_tokens


def test_a_repeated_prompt_reports_its_cached_tokens(client, server, reference, openai_schema):
    text = "prefix caching: the same words twice"
    expected = greedy_reference(reference, text, 10)
    first, again = (client.chat.completions.create(model=server.state.model_name, messages=user(text),
                                                   max_tokens=10, temperature=0) for _ in range(2))
    openai_schema("CreateChatCompletionResponse", again.model_dump(mode="json", exclude_unset=True))
    assert first.choices[0].message.content == again.choices[0].message.content == expected.text
    # the first shares at most the chat template's opening with earlier requests; the second finds
    # all of its prompt but the last token in the slot the first left
    assert first.usage.prompt_tokens_details.cached_tokens < expected.prompt_tokens - 1
    assert again.usage.prompt_tokens_details.cached_tokens == expected.prompt_tokens - 1
    stream = client.chat.completions.create(model=server.state.model_name, messages=user(text), max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    assert list(stream)[-1].usage.prompt_tokens_details.cached_tokens == expected.prompt_tokens - 1
    with server.http() as http:
        scrape = http.get("/metrics").text
    hits = [line for line in scrape.splitlines() if line.startswith("vllm:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 2 * (expected.prompt_tokens - 1)


def test_stream_agrees_with_non_stream_and_matches_schema(server, openai_schema, sse_payloads):
    body = {"model": server.state.model_name, "messages": user(PROMPTS[0]), "max_tokens": 20,
            "temperature": 0, **NO_EOS}
    with server.http() as http:
        whole = http.post("/v1/chat/completions", json=body).json()
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["spec_decode"] == whole["spec_decode"]
    assert all("usage" not in c for c in chunks)  # not asked for


def test_include_usage_only_on_a_final_empty_chunk(client, server):
    stream = client.chat.completions.create(
        model=server.state.model_name, messages=user(PROMPTS[1]), max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=NO_EOS)
    chunks = list(stream)
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 12
    assert last.usage.total_tokens == last.usage.prompt_tokens + 12
    assert all(c.usage is None for c in content)
    assert last.model_extra["spec_decode"]["verify_steps"] >= 1


def test_n_choices(client, server, openai_schema):
    response = client.chat.completions.create(
        model=server.state.model_name, messages=user(PROMPTS[2]), max_tokens=8, temperature=1.0, seed=3,
        n=2, extra_body=NO_EOS)
    openai_schema("CreateChatCompletionResponse", response.model_dump(mode="json", exclude_unset=True))
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens == 16
    stream = client.chat.completions.create(
        model=server.state.model_name, messages=user(PROMPTS[2]), max_tokens=8, temperature=1.0, seed=3,
        n=2, stream=True, extra_body=NO_EOS)
    texts, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert texts == {c.index: c.message.content for c in response.choices}  # same seeds, same text


def test_seeded_sampling_is_reproducible(client, server):
    def ask():
        return client.chat.completions.create(
            model=server.state.model_name, messages=user(PROMPTS[0]), max_tokens=16, temperature=0.9,
            top_p=0.9, seed=1234, extra_body={"top_k": 20, **NO_EOS}).choices[0].message.content

    assert ask() == ask()


def test_stop_string_is_cut_and_reported(client, server, reference):
    text = greedy_reference(reference, PROMPTS[0], 30).text
    start = next(i for i in range(3, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    response = client.chat.completions.create(
        model=server.state.model_name, messages=user(PROMPTS[0]), max_tokens=30, temperature=0,
        stop=[stop, "never-appears"])
    assert response.choices[0].message.content == text[: text.find(stop)]
    assert response.choices[0].finish_reason == "stop"
    single = client.chat.completions.create(
        model=server.state.model_name, messages=user(PROMPTS[0]), max_tokens=30, temperature=0, stop=stop)
    assert single.choices[0].message.content == text[: text.find(stop)]


def test_max_completion_tokens_and_length_finish(client, server):
    response = client.chat.completions.create(
        model=server.state.model_name, messages=user(PROMPTS[1]), max_completion_tokens=5, temperature=0,
        extra_body=NO_EOS)
    assert response.usage.completion_tokens == 5
    assert response.choices[0].finish_reason == "length"


def test_logprobs(client, server, openai_schema):
    response = client.chat.completions.create(
        model=server.state.model_name, messages=user(PROMPTS[0]), max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3, extra_body=NO_EOS)
    openai_schema("CreateChatCompletionResponse", response.model_dump(mode="json", exclude_unset=True))
    content = response.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the argmax
        assert bytes(entry.bytes).decode() == entry.token
    stream = client.chat.completions.create(
        model=server.state.model_name, messages=user(PROMPTS[0]), max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3, stream=True, extra_body=NO_EOS)
    streamed = [lp for chunk in stream for c in chunk.choices if c.logprobs for lp in c.logprobs.content]
    assert [lp.token for lp in streamed] == [lp.token for lp in content]


def test_unknown_fields_and_unsupported_ones_left_off_are_ignored(server):
    # unsupported fields (test_unsupported_fields.py) are accepted at their "off" value
    body = {"model": server.state.model_name, "messages": user("hi"), "max_tokens": 3, "temperature": 0,
            "frequency_penalty": 0, "tools": [], "parallel_tool_calls": True, "response_format": {"type": "text"},
            "user": "u1", "something_new": {"nested": [1, 2]}}
    with server.http() as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_text_completions(client, server, reference, openai_schema):
    prompt = "the quick brown"
    expected = reference.generate(reference.prepare_text(prompt), SamplingParams(max_tokens=10))
    response = client.completions.create(model=server.state.model_name, prompt=prompt, max_tokens=10,
                                         temperature=0)
    openai_schema("CreateCompletionResponse", response.model_dump(mode="json", exclude_unset=True))
    assert response.choices[0].text == expected.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server.state.model_name, prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert streamed == expected.text
    ids = reference.prepare_text(prompt).token_ids
    by_ids = client.completions.create(model=server.state.model_name, prompt=ids, max_tokens=10,
                                       temperature=0)
    assert by_ids.choices[0].text == expected.text


def test_text_completions_batch_logprobs_and_default_length(client, server, openai_schema):
    response = client.completions.create(
        model=server.state.model_name, prompt=["a red circle", "def add"], n=2, temperature=0, logprobs=2,
        extra_body=NO_EOS)
    openai_schema("CreateCompletionResponse", response.model_dump(mode="json", exclude_unset=True))
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text  # greedy: same prompt, same text
    assert response.usage.completion_tokens == 4 * 16  # OpenAI's default max_tokens is 16
    logprobs = response.choices[2].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 16
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_concurrent_clients_get_their_own_greedy_outputs(server, reference):
    expected = {t: greedy_reference(reference, t, 40).text for t in PROMPTS}

    def ask(text: str) -> tuple[str, str]:
        client = server.openai()
        stream = len(text) % 2 == 0
        response = client.chat.completions.create(
            model=server.state.model_name, messages=user(text), max_tokens=40, temperature=0, stream=stream)
        if stream:
            return text, "".join(c.choices[0].delta.content or "" for c in response if c.choices)
        return text, response.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, PROMPTS * 3))
    for text, output in results:
        assert output == expected[text]
    assert server.state.scheduler.num_running == 0


def test_prometheus_metrics_after_requests(client, server):
    client.chat.completions.create(model=server.state.model_name, messages=user(PROMPTS[0]), max_tokens=8,
                                   temperature=0, extra_body=NO_EOS)
    name = server.state.model_name
    assert server.metric("vllm:spec_decode_num_drafts_total", model_name=name) > 0
    assert server.metric("vllm:spec_decode_num_draft_tokens_total", model_name=name) > 0
    drafts = server.metric("vllm:spec_decode_num_drafts_total", model_name=name)
    accepted = server.metric("vllm:spec_decode_num_accepted_tokens_total", model_name=name)
    pos0 = server.metric("vllm:spec_decode_num_accepted_tokens_per_pos_total", model_name=name, position="0")
    assert pos0 <= drafts and accepted >= pos0
    assert server.metric("vllm:time_to_first_token_seconds_count", model_name=name) > 0
    assert server.metric("vllm:e2e_request_latency_seconds_count", model_name=name) > 0
    assert server.metric("vllm:time_per_output_token_seconds_count", model_name=name) > 0
    assert server.metric("vllm:request_success_total", model_name=name, finished_reason="length") > 0
    assert server.metric("vllm:num_requests_running", model_name=name) == 0
    assert server.metric("vllm:num_requests_waiting", model_name=name) == 0
    assert server.metric("specserve:http_requests_total", endpoint="/v1/chat/completions", status="200") > 0
