"""Tool calling end to end on a real model whose own chat template has tools: Qwen2.5-Coder-0.5B-Instruct
from the model store (its tokenizer has single tokens for `<tool_call>` and `</tool_call>`, which the
call grammar names by id), with the official client: a required call, streamed and not, then the
tool's result and the model's final answer. Slow: it pulls and converts a 0.5B model."""

from __future__ import annotations

import json

import pytest

from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig
from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings
from specserve.server.store.pull import pull

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def server(launch, store_cache):
    path = pull("qwen2.5-coder-0.5b", store_cache, progress=False)
    engine = Engine.from_config(EngineConfig(model=str(path), draft="ngram", max_num_seqs=2, max_model_len=2048))
    with launch(create_app(engine, ServerSettings(served_model_name="qwen"))) as up:
        yield up


def test_a_required_call_then_the_answer(server):
    client = server.openai(timeout=600)
    first = client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert first.model_extra["spec_decode"]["accepted_grammar_tokens"] > 0

    chunks = list(client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 temperature=0, max_tokens=64, stream=True))
    (delta,) = [c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or []]
    assert (delta.function.name, delta.function.arguments) == (call.function.name, call.function.arguments)

    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18})}]
    final = client.chat.completions.create(model="qwen", messages=history, tools=[WEATHER], temperature=0,
                                           max_tokens=48)
    assert final.choices[0].finish_reason in ("stop", "tool_calls", "length")
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were rendered
