"""`POST /v1/chat/completions`: messages (text and images) -> the model's chat template -> choices."""

from __future__ import annotations

from dataclasses import replace

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
from .tools import ToolSetup, ToolStream, history, parse_calls, setup


def prepare_chat(engine: Engine, messages: list[dict], tools: list[dict] | None = None) -> PromptInput:
    """Runs in the prepare pool. A template or processor that rejects the messages (roles that do not
    alternate, an image the processor cannot size) is a problem with the request, not the server."""
    try:
        return engine.prepare_chat(messages, tools)
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
    """Chat completion objects and chunks of one request (chunks with `token_origins` if asked;
    answers parsed for tool calls if the request has tools that may be called)."""

    def __init__(self, request_id: str, created: int, model: str, token_origins: bool,
                 tools: ToolSetup | None = None) -> None:
        self.head = {"id": request_id, "created": created, "model": model}
        self.token_origins = token_origins
        self.tools = tools if tools is not None and tools.parse else None
        self.streams: dict[int, ToolStream] = {}

    def chunk(self, index: int, result: StepResult, first: bool, metrics: SpecMetrics | None) -> dict:
        # The role travels with the first token (never ahead of it: clients time the first chunk).
        content, calls, finish_reason = result.text, None, result.finish_reason
        if self.tools is not None:
            stream = self.streams.setdefault(index, ToolStream(self.tools.names))
            content, calls = stream.feed(result.text, finish_reason is not None)
            finish_reason = _with_calls(finish_reason, stream.calls)
        # with tools, a chunk that only carries calls (or text held back) has no content
        shown = content if self.tools is None or content or first else None
        delta = Delta(role="assistant" if first else None, content=shown, tool_calls=calls or None)
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=chat_logprobs(result.logprobs),
                                 finish_reason=finish_reason,
                                 token_origins=origins(result) if self.token_origins else None)
        spec = metrics.to_dict() if metrics is not None else None
        return ChatCompletionChunk(**self.head, choices=[choice], spec_decode=spec).model_dump()

    def usage_chunk(self, usage: dict, metrics: SpecMetrics) -> dict:
        return ChatCompletionChunk(**self.head, choices=[], usage=Usage(**usage),
                                   spec_decode=metrics.to_dict()).model_dump()

    def response(self, results: list[ChoiceResult], usage: dict, metrics: SpecMetrics) -> dict:
        choices = []
        for i, r in enumerate(results):
            content, calls = (r.text, []) if self.tools is None else parse_calls(r.text, self.tools.names)
            choices.append(ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls or None),
                                      logprobs=chat_logprobs(r.logprobs),
                                      finish_reason=_with_calls(r.finish_reason, len(calls))))
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
    tools = setup(req, engine.prompts.chat_template, engine.tokenizer)
    with state.admission.hold(n):
        messages = await engine_messages(req.messages, state.settings, engine.check_image_size, state.pool.run)
        messages = [m | history(source, i) for i, (m, source) in enumerate(zip(messages, req.messages))]
        prompt = await state.prepare(prepare_chat, messages, tools.tools if tools is not None else None)
        params = chat_params(req, len(prompt.token_ids), engine.max_model_len, state.settings)
        if tools is not None and tools.grammar is not None:
            params = [replace(p, response_format=tools.grammar) for p in params]
        await state.check_format(params, "tools" if tools is not None and tools.grammar is not None else None)
        group = submit(state, [prompt] * len(params), params, arrival)
    renderer = ChatRenderer(state.new_id("chatcmpl"), state.now(), state.model_name, req.stream_origins, tools)
    return await respond(state, group, renderer, bool(req.stream), req.include_usage,
                         len(prompt.token_ids), arrival)


def _with_calls(finish_reason: str | None, calls: int) -> str | None:
    """OpenAI's finish reason of an answer that called tools (and ended on its own)."""
    return "tool_calls" if finish_reason == "stop" and calls else finish_reason
