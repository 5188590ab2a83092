"""Request bodies of the OpenAI-compatible API, as pydantic models.

Unknown fields are ignored (as OpenAI and vLLM do). Fields of OpenAI's API (and vLLM's) that would
change the output and that this server does not implement (penalties, legacy functions, vLLM's guided
decoding, ...) are known: a request may send them as null or as the value that means "off", and
anything else is a 400 naming the field, never an answer that silently ignores it. Known fields are
strict: JSON's types are not coerced (`"max_tokens": true`, `"stream": "yes"` and `"n": "2"` are
400s naming the field), except that an integer is a valid float. Every number has a range here;
limits that depend on the model or the settings (context length, n, the number of images) are
checked where those are known (`sampling.py`, `images.py`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOP_LOGPROBS = 20
MAX_TOP_K = 2**31 - 1  # any k past the vocabulary keeps every token; larger numbers only overflow


class _Body(BaseModel):
    # NaN/inf are accepted by some JSON encoders; they make no sense for any field here.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class ImageURL(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        # Some clients send the URL as a plain string; accept it as {"url": ...}.
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class CalledFunction(_Body):
    name: str
    arguments: str  # JSON text


class MessageToolCall(_Body):
    """An earlier answer's tool call, sent back in the history."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Body):
    # Legacy "function" messages are refused by the Literal (`functions` is not implemented).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: list[ContentPart] = Field(default_factory=list)  # may be left out only by an assistant's tool calls
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this is the result of

    @model_validator(mode="before")
    @classmethod
    def _content_or_calls(cls, value: Any) -> Any:
        if isinstance(value, dict) and "content" not in value and not value.get("tool_calls"):
            raise ValueError("a message needs content (only an assistant message with tool_calls may leave it out)")
        return value

    @model_validator(mode="after")
    def _tool_result_names_its_call(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _content_parts(cls, value: Any) -> Any:
        # A plain string is one text part; None (an assistant turn with tool calls) is empty.
        if value is None:
            return []
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        return value


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # calls that the grammar makes always match `parameters`


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: ChosenFunction


class StreamOptions(_Body):
    include_usage: bool | None = False


def _same(value: Any, off: Any) -> bool:
    """JSON equality: `false` is not `0`, `1` is `1.0`."""
    return isinstance(value, bool) == isinstance(off, bool) and value == off


def _only(*off: Any) -> BeforeValidator:
    """A field this server does not implement: null or one of `off` (the values that change nothing)."""
    shown = " or ".join(json.dumps(value) for value in (None, *off))

    def check(value: Any) -> Any:
        if value is None or any(_same(value, o) for o in off):
            return value
        raise ValueError(f"not supported by this server (only {shown} is accepted)")

    return BeforeValidator(check)


MAX_SCHEMA_CHARS = 64 * 1024  # a response format's JSON schema, as JSON text


class JSONSchemaSpec(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    # OpenAI's strict mode rejects schema features its decoder cannot enforce; this server enforces
    # every schema it accepts (and refuses the rest), so both values mean the same here
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value)) > MAX_SCHEMA_CHARS:
            raise ValueError(f"the schema is longer than {MAX_SCHEMA_CHARS} characters of JSON")
        return value


class TextFormat(_Body):
    type: Literal["text"]


class JSONObjectFormat(_Body):
    type: Literal["json_object"]


class JSONSchemaFormat(_Body):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormatBody = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


def _stop_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class _Sampling(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)  # extra field (vLLM); -1 or 0 = off
    stop: list[str] | None = None
    n: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # extra field (vLLM), for benchmarks that need fixed lengths
    # extra fields (this server's): false = no draft tree for this request (plain decoding, the same
    # output), e.g. to compare; true = stream chunks carry each token's origin (`token_origins`)
    speculative: bool | None = True
    return_token_origins: bool | None = False

    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]
    min_tokens: int | None = Field(default=None, ge=0)  # extra field (vLLM): no EOS or stop before this many
    response_format: ResponseFormatBody | None = None  # text, any JSON object, or JSON matching a schema
    # not implemented: OpenAI's penalties; vLLM's extra sampling and guided decoding fields
    frequency_penalty: Annotated[Any, _only(0)] = None
    presence_penalty: Annotated[Any, _only(0)] = None
    repetition_penalty: Annotated[Any, _only(1)] = None
    min_p: Annotated[Any, _only(0)] = None
    use_beam_search: Annotated[Any, _only(False)] = None
    guided_json: Annotated[Any, _only()] = None
    guided_regex: Annotated[Any, _only()] = None
    guided_choice: Annotated[Any, _only()] = None
    guided_grammar: Annotated[Any, _only()] = None
    structured_outputs: Annotated[Any, _only()] = None

    _normalize_stop = field_validator("stop", mode="before")(_stop_list)

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not (token.isascii() and token.isdigit()):
                raise ValueError(f"keys must be token ids, not {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} is {bias}; it must be in [-100, 100]")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def stream_origins(self) -> bool:
        """Token origins are sent on streams only."""
        return bool(self.stream and self.return_token_origins)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # null: true (OpenAI's default)
    # not implemented: legacy functions, predicted outputs, audio, reasoning and search options
    functions: Annotated[Any, _only([])] = None
    function_call: Annotated[Any, _only("none")] = None
    prediction: Annotated[Any, _only()] = None
    audio: Annotated[Any, _only()] = None
    modalities: Annotated[Any, _only(["text"])] = None
    reasoning_effort: Annotated[Any, _only()] = None
    verbosity: Annotated[Any, _only("medium")] = None
    web_search_options: Annotated[Any, _only()] = None


class CompletionRequest(_Sampling):
    prompt: list[str | list[int]]  # normalized: one entry per prompt of a batch
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: Annotated[Any, _only("")] = None  # not implemented: insertion
    best_of: int | None = Field(default=None, ge=1)  # only best_of = n: no extra candidates to rank

    @field_validator("best_of")
    @classmethod
    def _no_extra_candidates(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n") or 1
        if value is not None and value != n:
            raise ValueError(f"not supported by this server: it ranks no extra candidates (only null or n = {n} "
                             "is accepted)")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_batch(cls, value: Any) -> Any:
        """str | list[int] | list[str] | list[list[int]] -> a list of prompts (str or token ids)."""
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not value:
            raise ValueError("prompt must be a string, a list of token ids, or a non-empty list of those")
        if all(_is_token(t) for t in value):
            return [value]
        if all(isinstance(p, str) or (isinstance(p, list) and all(_is_token(t) for t in p)) for p in value):
            return value
        raise ValueError("prompt must be a string, a list of token ids, or a list of those")


def field_path(loc: tuple) -> tuple:
    """A validation error's location without the union tag pydantic inserts after a content part's
    index: ("messages", 0, "content", 1, "image_url", "image_url", "url") names the field
    messages[1].content[1].image_url.url."""
    out: list = []
    for i, part in enumerate(loc):
        after_part_index = i >= 2 and loc[i - 2] == "content" and isinstance(loc[i - 1], int)
        if not (after_part_index and part in ("text", "image_url")):
            out.append(part)
    return tuple(out)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
