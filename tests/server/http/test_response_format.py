"""`response_format` over a real socket with the official client: JSON that matches the schema (chat
and text completions, streamed and not, the client's own pydantic `parse`), the grammar's share of the
drafts in `spec_decode`, and 400s naming the field for formats and combinations that cannot be served."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from specserve.server.http.app import create_app
from specserve.server.http.protocol import MAX_SCHEMA_CHARS
from specserve.server.http.settings import ServerSettings

SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["color", "n"],
    "properties": {"color": {"enum": ["red", "blue", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


class Shape(pydantic.BaseModel):
    ok: bool
    color: Literal["red", "blue"]  # closed values: a random model's answer ends within max_tokens


@pytest.fixture(scope="module")
def server(launch, make_engine):
    with launch(create_app(make_engine(), ServerSettings(served_model_name="tiny"))) as running:
        yield running


def test_chat_answers_match_the_schema_and_say_what_the_grammar_drafted(server):
    answer = server.openai().chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40,
                                                     response_format=JSON_SCHEMA)
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)
    spec = answer.model_extra["spec_decode"]
    assert 0 < spec["accepted_grammar_tokens"] <= spec["grammar_draft_tokens"] <= spec["proposed_draft_tokens"]


def test_a_stream_joins_to_the_same_json(server):
    client = server.openai()
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40,
                                           response_format=JSON_SCHEMA).choices[0].message.content
    chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40,
                                            response_format=JSON_SCHEMA, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_sampled_choices_all_match_the_schema(server):
    answer = server.openai().chat.completions.create(model="tiny", messages=MESSAGES, temperature=1.0, seed=5, n=4,
                                                     max_tokens=40, response_format=JSON_SCHEMA)
    for choice in answer.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_the_clients_pydantic_parse_round_trips(server):
    parsed = server.openai().chat.completions.parse(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40,
                                                    response_format=Shape)
    assert isinstance(parsed.choices[0].message.parsed, Shape)


def test_text_completions_take_json_object(server):
    with server.http() as http:
        body = http.post("/v1/completions", json={"model": "tiny", "prompt": "the quick", "max_tokens": 40,
                                                  "temperature": 0, "response_format": {"type": "json_object"}}).json()
    choice = body["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)
    else:  # a random model may fill an object until max_tokens: what it wrote is an object's beginning
        assert choice["text"].startswith("{")


@pytest.mark.parametrize("response_format, extra, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, {}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "weird"}}}, {},
     "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, {}, "response_format"),
    ({"type": "json_schema"}, {}, "response_format"),
    ({"type": "xml"}, {}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["a" * MAX_SCHEMA_CHARS]}}}, {},
     "response_format"),
    ({"type": "json_object"}, {"ignore_eos": True}, "ignore_eos"),
    ({"type": "json_object"}, {"min_tokens": 3}, "min_tokens"),
])
def test_formats_that_cannot_be_served_are_400s_naming_the_field(server, response_format, extra, param):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4,
                                                           "response_format": response_format, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == param
    with server.http() as http:  # the server goes on answering
        assert http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                       "max_tokens": 2}).status_code == 200


def test_the_official_client_sees_the_bad_schema(server):
    with pytest.raises(openai.BadRequestError) as error:
        server.openai().chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}})
    assert error.value.body["param"] == "response_format" and "strin" in error.value.body["message"]
