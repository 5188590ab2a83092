"""The OpenAPI 3.0 -> JSON Schema translation the response checks rely on, on literal cases, and
proof that the resulting validators reject responses that break OpenAI's schemas."""

from __future__ import annotations

import jsonschema
import pytest


def validator(to_json_schema, schema: dict, defs: dict | None = None) -> jsonschema.Draft202012Validator:
    root = {"$defs": to_json_schema(defs or {}), **to_json_schema(schema)}
    return jsonschema.Draft202012Validator(root)


def test_nullable_admits_null_only_where_declared(to_json_schema):
    nullable = validator(to_json_schema, {"type": "string", "nullable": True})
    assert nullable.is_valid(None) and nullable.is_valid("x") and not nullable.is_valid(3)
    plain = validator(to_json_schema, {"type": "string", "nullable": False})
    assert not plain.is_valid(None)


def test_nullable_enum_and_ref(to_json_schema):
    enum = validator(to_json_schema, {"type": "string", "enum": ["stop", "length"], "nullable": True})
    assert enum.is_valid(None) and enum.is_valid("stop") and not enum.is_valid("other")
    ref = validator(to_json_schema, {"$ref": "#/components/schemas/Usage", "nullable": True},
                    {"Usage": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}})
    assert ref.is_valid(None) and ref.is_valid({"n": 1}) and not ref.is_valid({})


def test_nested_nullable_properties(to_json_schema):
    schema = {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "array", "nullable": True, "items": {"type": "integer", "nullable": True}}}}
    check = validator(to_json_schema, schema)
    assert check.is_valid({"a": None}) and check.is_valid({"a": [1, None]})
    assert not check.is_valid({"a": ["x"]}) and not check.is_valid({})


def test_boolean_exclusive_bounds(to_json_schema):
    check = validator(to_json_schema, {"type": "number", "minimum": 0, "exclusiveMinimum": True})
    assert check.is_valid(0.5) and not check.is_valid(0)


GOOD = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                 "message": {"role": "assistant", "content": "hi", "refusal": None}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def test_openai_validators_have_teeth(openai_schema):
    openai_schema("CreateChatCompletionResponse", GOOD)
    broken = [
        {**GOOD, "object": "chat.completion.chunk"},
        {**GOOD, "choices": [{**GOOD["choices"][0], "finish_reason": "done"}]},
        {**GOOD, "choices": [{**GOOD["choices"][0], "message": {"role": "assistant", "content": "x"}}]},
        {k: v for k, v in GOOD.items() if k != "created"},
    ]
    for body in broken:
        with pytest.raises(jsonschema.ValidationError):
            openai_schema("CreateChatCompletionResponse", body)
    openai_schema("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None, "code": None}})
    with pytest.raises(jsonschema.ValidationError):
        openai_schema("ErrorResponse", {"error": {"message": "m", "type": "t"}})
