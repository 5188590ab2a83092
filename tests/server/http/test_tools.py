"""Tool calling over a real socket with the official client, on a tiny random model whose chat template
(written here, in the `<tool_call>` style of Qwen2.5 and Hermes) renders tools, calls and results:
required and named calls made by the grammar (arguments that match the parameters schema), streamed
and not, the call -> result -> answer round trip, the parser on hand-written answers, and 400s."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings
from specserve.server.http.tools import ToolStream, parse_calls

TOOL_TEMPLATE = (
    # the tiny test tokenizer spends a token per character outside its corpus: tools by name only
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    " (answer <tool_call>)<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}"
    "\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>\n{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def server(launch, make_engine):
    with launch(create_app(make_engine(chat_template=TOOL_TEMPLATE), ServerSettings(served_model_name="tiny"))) as up:
        yield up


@pytest.fixture(scope="module")
def plain_server(launch, make_engine):
    with launch(create_app(make_engine(), ServerSettings(served_model_name="tiny"))) as up:
        yield up


def check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_required_call_matches_its_tools_schema(server):
    answer = server.openai().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                                     temperature=0, max_tokens=120)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls)
    spec = answer.model_extra["spec_decode"]
    assert spec["accepted_grammar_tokens"] > 0  # `<tool_call>`, the name and the keys are forced


def test_a_named_function_is_the_one_called_once_without_parallel_calls(server):
    answer = server.openai().chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False, temperature=0, max_tokens=120)
    calls = answer.choices[0].message.tool_calls
    check_calls(calls)
    assert len(calls) == 1 and calls[0].function.name == "get_time"


def test_a_streamed_call_equals_the_whole_one(server):
    client = server.openai()
    kwargs = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == \
        [(c.function.name, c.function.arguments) for c in whole]
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_call_result_answer_round_trip(server):
    client = server.openai()
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=120).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    final = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, temperature=0, max_tokens=8)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the template saw the call and its result: the second prompt holds both
    assert final.usage.prompt_tokens > len(json.dumps(call.function.arguments)) // 4
    with server.http() as http:
        shorter = http.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "tools": TOOLS,
                                                          "max_tokens": 1}).json()
    assert final.usage.prompt_tokens > shorter["usage"]["prompt_tokens"] + 10


def test_parse_calls_keeps_text_and_drops_what_is_not_a_call():
    names = frozenset({"get_weather"})
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\nnot json\n</tool_call><tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>')
    content, calls = parse_calls(text, names)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert content.startswith("Let me check.") and "not json" in content and "rm_rf" in content
    assert parse_calls("no calls here", names) == ("no calls here", [])
    assert parse_calls('<tool_call>{"name": "get_weather", "arguments": "{}"}</tool_call>', names)[0] is None


def test_the_stream_parser_holds_back_what_may_open_a_call():
    stream = ToolStream(frozenset({"get_time"}))
    pieces = ["Hi <to", "ol_", 'call>\n{"name": "get_time", ', '"arguments": {"zone": "UTC"}}\n</tool', "_call>",
              "\n", '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', " <tool"]
    out = [stream.feed(p, finished=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert out[0] == ("Hi ", []) and out[1] == ("", []) and out[2] == ("", []) and out[3] == ("", [])
    first = out[4][1][0]
    assert first.index == 0 and first.function.name == "get_time"
    assert json.loads(first.function.arguments) == {"zone": "UTC"}
    assert out[5] == ("", [])  # whitespace between calls is not content
    assert out[6][1][0].index == 1
    assert out[7] == (" <tool", [])  # the end: a held-back prefix was text


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "ignore_eos": True}, "tool_choice"),
    ({"messages": ASK + [{"role": "tool", "content": "21"}]}, "messages"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{not json"}}]}]},
     "messages"),
])
def test_bad_tool_requests_are_400s_naming_the_field(server, body, param):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 4} | body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0].split("[")[0] == param


def test_a_template_without_tools_refuses_them(plain_server):
    with pytest.raises(openai.BadRequestError) as error:
        plain_server.openai().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=4)
    assert error.value.body["param"] == "tools" and "no tool support" in error.value.body["message"]
    answer = plain_server.openai().chat.completions.create(model="tiny", messages=ASK, max_tokens=2)
    assert answer.choices[0].message.tool_calls is None


def test_calls_match_openais_published_schemas(server, openai_schema):
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "temperature": 0,
            "max_tokens": 120}
    with server.http() as http:
        whole = http.post("/v1/chat/completions", json=body).json()
        with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
            payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    openai_schema("CreateChatCompletionResponse", whole)
    assert whole["choices"][0]["message"]["tool_calls"]
    for payload in payloads[:-1]:
        openai_schema("CreateChatCompletionStreamResponse", json.loads(payload))
