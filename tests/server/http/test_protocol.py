"""Request models and their conversion to `SamplingParams` (no server): normalisation of content,
stop and prompts, OpenAI's defaults, the limits that need the prompt length, and the per-choice
seeds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from specserve.server.engine.config import SamplingParams
from specserve.server.http.errors import APIError, from_validation_error
from specserve.server.http.protocol import (
    INT64_MAX,
    INT64_MIN,
    ChatCompletionRequest,
    CompletionRequest,
    ImagePart,
    TextPart,
    field_path,
)
from specserve.server.http.sampling import chat_params, completion_params, per_choice
from specserve.server.http.settings import ServerSettings

SETTINGS = ServerSettings()


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_content_forms_are_normalised():
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "plain"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "image_url", "image_url": "data:image/png;base64,AA"}]},
    ], "stop": "END", "brand_new_field": 1})
    first, second, third = request.messages
    assert first.content == [TextPart(type="text", text="plain")]
    assert second.content == []
    assert isinstance(third.content[1], ImagePart) and third.content[1].image_url.url.startswith("data:")
    assert request.stop == ["END"]


def test_error_locations_name_request_fields():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "image_url", "image_url": {}}]}]})
    error = from_validation_error(info.value, field_path)
    assert error.status == 400 and error.param == "messages[0].content[1].image_url.url"
    assert field_path(("messages", 0, "content", 0, "text", "text")) == ("messages", 0, "content", 0, "text")


@pytest.mark.parametrize("prompt, expected", [
    ("text", ["text"]),
    ([1, 2, 3], [[1, 2, 3]]),
    (["a", "b"], ["a", "b"]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompt_forms(prompt, expected):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == expected


@pytest.mark.parametrize("prompt", [[], [True, False], [1, "a"], [[1], "a", 2], {"a": 1}, None, 3])
def test_bad_completion_prompts(prompt):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": prompt})
    assert from_validation_error(info.value, field_path).param == "prompt"


def test_openai_defaults():
    (params,) = chat_params(chat(), prompt_len=10, max_model_len=100, settings=SETTINGS)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0
    assert params.max_tokens == 90  # the rest of the context
    assert params.logprobs is None and params.stop == () and params.seed is None
    (capped,) = chat_params(chat(), 10, 100, ServerSettings(default_max_tokens=16))
    assert capped.max_tokens == 16
    (text,) = completion_params(CompletionRequest.model_validate({"prompt": "x"}), 10, 100, SETTINGS, 16)
    assert text.max_tokens == 16


def test_field_mapping():
    (params,) = chat_params(chat(temperature=0, top_k=-1, logprobs=True, top_logprobs=4, max_tokens=7,
                                 max_completion_tokens=5, stop=["a", "b"], ignore_eos=True), 10, 100, SETTINGS)
    assert params == SamplingParams(max_tokens=5, temperature=0.0, top_p=1.0, top_k=0, stop=("a", "b"),
                                    seed=None, logprobs=4, ignore_eos=True)
    (plain_logprobs,) = chat_params(chat(logprobs=True), 10, 100, SETTINGS)
    assert plain_logprobs.logprobs == 0


@pytest.mark.parametrize("fields, prompt_len, param", [
    ({"max_tokens": 91}, 10, "max_tokens"),
    ({"max_completion_tokens": 91}, 10, "max_completion_tokens"),
    ({}, 100, "messages"),
    ({"n": 9}, 10, "n"),
    ({"stop": ["x"] * 17}, 10, "stop"),
    ({"top_logprobs": 2}, 10, "top_logprobs"),
])
def test_limits_needing_the_prompt_or_settings(fields, prompt_len, param):
    with pytest.raises(APIError) as info:
        chat_params(chat(**fields), prompt_len, 100, SETTINGS)
    assert info.value.status == 400 and info.value.param == param


def test_server_cap_on_max_tokens():
    with pytest.raises(APIError) as info:
        chat_params(chat(max_tokens=33), 10, 100, ServerSettings(max_tokens_limit=32))
    assert info.value.param == "max_tokens"
    (params,) = chat_params(chat(), 10, 100, ServerSettings(max_tokens_limit=32))
    assert params.max_tokens == 32


def test_per_choice_seeds_differ_and_wrap_inside_int64():
    params = SamplingParams(temperature=1.0, seed=INT64_MAX)
    seeds = [p.seed for p in per_choice(params, 3)]
    assert seeds == [INT64_MAX, INT64_MIN, INT64_MIN + 1]
    assert per_choice(SamplingParams(), 2) == [SamplingParams()] * 2


def test_seed_range_is_int64():
    chat(seed=INT64_MAX)
    chat(seed=INT64_MIN)
    for bad in (INT64_MAX + 1, INT64_MIN - 1):
        with pytest.raises(ValidationError):
            chat(seed=bad)
