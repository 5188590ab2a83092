"""`POST /v1/chat/completions`: messages (text and images) -> the model's chat template -> choices."""

from __future__ import annotations

from jinja2 import TemplateError
from starlette.responses import Response

from ..engine.engine import Engine
from ..engine.errors import RequestError
from ..engine.metrics import SpecMetrics
from ..engine.outputs import PromptInput
from .generation import ChoiceResult, StepResult, TokenInfo, origins, respond, submit
from .images import check_image_count, engine_messages
from .protocol import ChatCompletionRequest, ChatMessage, TextPart
from .responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionTokenLogprob,
    ChatLogprobs,
    Delta,
    TopLogprob,
    Usage,
)
from .sampling import chat_params, check_choices, check_prompt_chars
from .state import ServerState


def prepare_chat(engine: Engine, messages: list[dict]) -> PromptInput:
    """Runs in the prepare pool. A template or processor that rejects the messages (roles that do not
    alternate, an image the processor cannot size) is a problem with the request, not the server."""
    try:
        return engine.prepare_chat(messages)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
        if isinstance(exc, RequestError):
            raise
        raise RequestError(f"could not build the prompt from these messages: {exc}", "messages") from None


def text_chars(messages: list[ChatMessage]) -> int:
    """Characters of the messages' text parts: what the tokenizer will read."""
    return sum(len(part.text) for m in messages for part in m.content if isinstance(part, TextPart))


def chat_logprobs(infos: list[TokenInfo] | None) -> ChatLogprobs | None:
    if infos is None:
        return None
    return ChatLogprobs(content=[
        ChatCompletionTokenLogprob(
            token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
            top_logprobs=[TopLogprob(token=s, logprob=v, bytes=list(s.encode())) for s, v in t.top],
        )
        for t in infos
    ])


class ChatRenderer:
    """Chat completion objects and chunks of one request (chunks with `token_origins` if asked)."""

    def __init__(self, request_id: str, created: int, model: str, token_origins: bool) -> None:
        self.head = {"id": request_id, "created": created, "model": model}
        self.token_origins = token_origins

    def chunk(self, index: int, result: StepResult, first: bool, metrics: SpecMetrics | None) -> dict:
        # The role travels with the first token (never ahead of it: clients time the first chunk).
        delta = Delta(role="assistant" if first else None, content=result.text)
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=chat_logprobs(result.logprobs),
                                 finish_reason=result.finish_reason,
                                 token_origins=origins(result) if self.token_origins else None)
        spec = metrics.to_dict() if metrics is not None else None
        return ChatCompletionChunk(**self.head, choices=[choice], spec_decode=spec).model_dump()

    def usage_chunk(self, usage: dict, metrics: SpecMetrics) -> dict:
        return ChatCompletionChunk(**self.head, choices=[], usage=Usage(**usage),
                                   spec_decode=metrics.to_dict()).model_dump()

    def response(self, results: list[ChoiceResult], usage: dict, metrics: SpecMetrics) -> dict:
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=r.text), logprobs=chat_logprobs(r.logprobs),
                       finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ]
        return ChatCompletion(**self.head, choices=choices, usage=Usage(**usage),
                              spec_decode=metrics.to_dict()).model_dump()


async def serve_chat(state: ServerState, req: ChatCompletionRequest, arrival: float) -> Response:
    """The cheap limits, then a place in the queue (or 429), then images and the chat template (in
    the prepare pool), then the n choices."""
    engine = state.scheduler.engine
    n = req.n or 1
    check_choices(n, 1, state.settings)
    check_image_count(req.messages, state.settings, engine.is_multimodal)
    check_prompt_chars(text_chars(req.messages), engine.max_model_len, state.settings, "messages")
    with state.admission.hold(n):
        messages = await engine_messages(req.messages, state.settings, engine.check_image_size, state.pool.run)
        prompt = await state.prepare(prepare_chat, messages)
        params = chat_params(req, len(prompt.token_ids), engine.max_model_len, state.settings)
        await state.check_format(params)
        group = submit(state, [prompt] * len(params), params, arrival)
    renderer = ChatRenderer(state.new_id("chatcmpl"), state.now(), state.model_name, req.stream_origins)
    return await respond(state, group, renderer, bool(req.stream), req.include_usage,
                         len(prompt.token_ids), arrival)
