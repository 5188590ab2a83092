"""Response bodies and stream chunks, shaped to OpenAI's published schemas
(`CreateChatCompletionResponse`, `CreateChatCompletionStreamResponse`, `CreateCompletionResponse`,
`ListModelsResponse`). Fields the schemas require are always present (null where nullable); fields
that may not be null there (a delta's `role`) are left out instead. `spec_decode` is this server's
extra: the request's speculative-decoding metrics (`SpecMetrics.to_dict()`); so is a stream choice's
`token_origins`, present only when the request set `return_token_origins`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


def _omit_none() -> Any:
    return Field(default=None, exclude_if=lambda v: v is None)


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV rows were reused, not prefilled (prefix caching)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(BaseModel):
    """A stream's tool call: this server sends each call whole, in one delta."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None: the answer is tool calls only
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = _omit_none()


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    spec_decode: dict = Field(default_factory=dict)


class Delta(BaseModel):
    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()
    tool_calls: list[ToolCallDelta] | None = _omit_none()


class TokenOrigin(BaseModel):
    """One streamed token: its text (the chunk's texts join to its content) and where it came from:
    `depth` d >= 1 is a draft token accepted at tree depth d, 0 the target's own (bonus or first) token."""

    text: str
    depth: int


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_origins: list[TokenOrigin] | None = _omit_none()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _omit_none()
    spec_decode: dict | None = _omit_none()


class TextLogprobs(BaseModel):
    """The legacy completions logprobs format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: str | None = None
    token_origins: list[TokenOrigin] | None = _omit_none()


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = _omit_none()
    spec_decode: dict | None = _omit_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specserve"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
