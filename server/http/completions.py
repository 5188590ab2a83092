"""`POST /v1/completions`: plain prompts (text or token ids, optionally a batch), for benchmark tools."""

from __future__ import annotations

from starlette.responses import Response

from ..engine.engine import Engine
from ..engine.metrics import SpecMetrics
from ..engine.outputs import PromptInput
from .generation import ChoiceResult, StepResult, TokenInfo, origins, respond, submit
from .protocol import CompletionRequest
from .responses import Completion, TextChoice, TextLogprobs, Usage
from .sampling import check_choices, check_prompt_chars, check_prompt_len, completion_params
from .state import ServerState

DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default for this endpoint


def prepare_prompts(engine: Engine, prompts: list[str | list[int]]) -> list[PromptInput]:
    """Runs in the prepare pool; token ids are range-checked by the engine."""
    return [engine.prepare_text(p) for p in prompts]


def text_logprobs(infos: list[TokenInfo] | None, offset: int) -> TextLogprobs | None:
    """The legacy format; `offset` is where these tokens' text starts in the choice's text."""
    if infos is None:
        return None
    out = TextLogprobs()
    for t in infos:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append(dict(t.top))
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


class CompletionRenderer:
    """Text completion objects and chunks of one request (chunks with `token_origins` if asked)."""

    def __init__(self, request_id: str, created: int, model: str, token_origins: bool) -> None:
        self.head = {"id": request_id, "created": created, "model": model}
        self.token_origins = token_origins
        self._offsets: dict[int, int] = {}  # per choice: characters streamed so far

    def chunk(self, index: int, result: StepResult, first: bool, metrics: SpecMetrics | None) -> dict:
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(result.text)
        choice = TextChoice(index=index, text=result.text, logprobs=text_logprobs(result.logprobs, offset),
                            finish_reason=result.finish_reason,
                            token_origins=origins(result) if self.token_origins else None)
        spec = metrics.to_dict() if metrics is not None else None
        return Completion(**self.head, choices=[choice], spec_decode=spec).model_dump()

    def usage_chunk(self, usage: dict, metrics: SpecMetrics) -> dict:
        return Completion(**self.head, choices=[], usage=Usage(**usage),
                          spec_decode=metrics.to_dict()).model_dump()

    def response(self, results: list[ChoiceResult], usage: dict, metrics: SpecMetrics) -> dict:
        choices = [
            TextChoice(index=i, text=r.text, logprobs=text_logprobs(r.logprobs, 0), finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ]
        return Completion(**self.head, choices=choices, usage=Usage(**usage),
                          spec_decode=metrics.to_dict()).model_dump()


async def serve_completion(state: ServerState, req: CompletionRequest, arrival: float) -> Response:
    """The cheap limits, then a place in the queue (or 429), then each prompt tokenized (in the
    prepare pool) and n choices per prompt; choice `i * n + j` is the j-th choice of prompt i, as
    OpenAI numbers them."""
    engine = state.scheduler.engine
    n = req.n or 1
    check_choices(n, len(req.prompt), state.settings)
    for prompt in req.prompt:
        if isinstance(prompt, str):
            check_prompt_chars(len(prompt), engine.max_model_len, state.settings, "prompt")
        else:
            check_prompt_len(len(prompt), engine.max_model_len, "prompt")
    with state.admission.hold(n * len(req.prompt)):
        prompts = await state.prepare(prepare_prompts, req.prompt)
        all_prompts, all_params = [], []
        for prompt in prompts:
            params = completion_params(req, len(prompt.token_ids), engine.max_model_len, state.settings,
                                       DEFAULT_MAX_TOKENS)
            all_prompts += [prompt] * len(params)
            all_params += params
        await state.check_format(all_params)
        group = submit(state, all_prompts, all_params, arrival)
    renderer = CompletionRenderer(state.new_id("cmpl"), state.now(), state.model_name, req.stream_origins)
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return await respond(state, group, renderer, bool(req.stream), req.include_usage, prompt_tokens,
                         arrival)
