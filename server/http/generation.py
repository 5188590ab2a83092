"""Running a request's sequences through the scheduler: results for a JSON response, or an event
stream; shared by chat and text completions, which differ only in how they render (`Renderer`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from starlette.responses import JSONResponse, Response

from ..engine.engine import Engine
from ..engine.events import Event, NotReady, QueueFull, RequestGroup
from ..engine.metrics import SpecMetrics
from ..engine.outputs import StepOutput
from .errors import APIError, engine_error
from .logs import RequestLog, current_request
from .responses import TokenOrigin
from .sse import DONE, PING, EventStream, sse_event
from .state import ServerState

LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the processed distribution excludes gets this


@dataclass(frozen=True)
class TokenInfo:
    """One token's logprob with its text (and its top alternatives), ready for either API format."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class StepResult:
    """A step's output as the HTTP layer needs it; built on the worker, which owns the tokenizer."""

    text: str
    num_tokens: int
    logprobs: list[TokenInfo] | None
    finish_reason: str | None
    origins: list[tuple[str, int]]  # per token: its text and depth (`StepOutput.token_texts`, `.depths`)


def postprocess(engine: Engine, out: StepOutput) -> StepResult:
    """Scheduler hook: attach token strings to the step's logprobs."""
    infos = None
    if out.logprobs is not None:
        decode = engine.tokenizer.decode
        infos = [
            TokenInfo(decode([lp.token_id]), _finite(lp.logprob),
                      [(decode([tid]), _finite(value)) for tid, value in lp.top])
            for lp in out.logprobs
        ]
    return StepResult(out.text, len(out.token_ids), infos, out.finish_reason,
                      list(zip(out.token_texts, out.depths)))


def origins(result: StepResult) -> list[TokenOrigin]:
    """A stream chunk's `token_origins`: each token's text and depth."""
    return [TokenOrigin(text=text, depth=depth) for text, depth in result.origins]


def _finite(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN to the floor


@dataclass
class ChoiceResult:
    """A whole choice, accumulated from its events."""

    text: str = ""
    logprobs: list[TokenInfo] | None = None
    finish_reason: str = "stop"
    num_tokens: int = 0
    cached_tokens: int = 0
    metrics: SpecMetrics = field(default_factory=SpecMetrics)

    def add(self, event: Event) -> None:
        result: StepResult = event.output
        self.text += result.text
        if result.logprobs is not None:
            self.logprobs = self.logprobs if self.logprobs is not None else []
            self.logprobs.extend(result.logprobs)
        if event.finished:
            self.finish_reason = result.finish_reason or "stop"
            self.num_tokens = event.num_output_tokens
            self.cached_tokens = event.num_cached_tokens
            self.metrics = event.metrics or SpecMetrics()


def merged_metrics(metrics: list[SpecMetrics]) -> SpecMetrics:
    total = SpecMetrics()
    for m in metrics:
        total.merge(m)
    return total


async def collect(group: RequestGroup) -> tuple[list[ChoiceResult], float]:
    """Every choice of the request, in index order, and when the first token arrived
    (`time.monotonic`); raises the first failure as an `APIError`."""
    results = [ChoiceResult() for _ in range(group.size)]
    done, first_time = 0, None
    while done < group.size:
        event = await group.next_event()
        if event.error is not None:
            raise engine_error(event.error)
        first_time = time.monotonic() if first_time is None else first_time
        results[event.index].add(event)
        done += event.finished
    return results, first_time


async def first_event(group: RequestGroup) -> Event:
    """The first step's event (the first token exists); a failure before it is a plain HTTP error."""
    event = await group.next_event()
    if event.error is not None:
        raise engine_error(event.error)
    return event


class Renderer(Protocol):
    """How an endpoint shapes stream chunks. With `token_origins` its chunks carry each token's
    origin, so a step is sent even when all its text is held back (its tokens still count)."""

    token_origins: bool

    def chunk(self, index: int, result: StepResult, first: bool, metrics: SpecMetrics | None) -> dict: ...
    def usage_chunk(self, usage: dict, metrics: SpecMetrics) -> dict: ...
    def response(self, results: list[ChoiceResult], usage: dict, metrics: SpecMetrics) -> dict: ...


async def stream_events(
    group: RequestGroup, first: Event, renderer: Renderer, include_usage: bool, prompt_tokens: int,
    on_done: Callable[[int, SpecMetrics], None] = lambda tokens, metrics: None,
) -> AsyncIterator[bytes]:
    """SSE bytes: one chunk per step and choice; the finishing chunk of a choice carries its
    `spec_decode`; then, if asked, a usage chunk with `choices: []`; then `[DONE]`. A failure goes
    out as `data: {"error": ...}` and ends the stream. `on_done(completion tokens, metrics)` hears a
    stream that finished."""
    started: set[int] = set()
    finished: list[Event] = []
    event = first
    while True:
        if event.error is not None:
            yield sse_event(engine_error(event.error).body())
            yield DONE
            return
        first_of_choice = event.index not in started
        result: StepResult = event.output
        # A step whose text is all held back (a partial character, a possible stop string) and
        # carries nothing else is not sent: an empty delta tells the client nothing.
        if first_of_choice or event.finished or result.text or result.logprobs or renderer.token_origins:
            yield sse_event(renderer.chunk(event.index, result, first_of_choice,
                                           event.metrics if event.finished else None))
        started.add(event.index)
        if event.finished:
            finished.append(event)
            if len(finished) == group.size:
                break
        event = await group.next_event()
    completion_tokens = sum(e.num_output_tokens for e in finished)
    metrics = merged_metrics([e.metrics for e in finished])
    on_done(completion_tokens, metrics)
    if include_usage:
        cached = max(e.num_cached_tokens for e in finished)
        yield sse_event(renderer.usage_chunk(usage(prompt_tokens, completion_tokens, cached), metrics))
    yield DONE


async def _events_after(
    waiting: asyncio.Future[Event], keepalive_s: float, group: RequestGroup, renderer: Renderer,
    include_usage: bool, prompt_tokens: int, arrival: float, record: RequestLog,
) -> AsyncIterator[bytes]:
    """`: ping` every `keepalive_s` until the first event, then the stream's events."""
    try:
        while not waiting.done():
            yield PING
            await asyncio.wait({waiting}, timeout=keepalive_s)
        first = waiting.result()
    except APIError as exc:  # failed after the headers went out: an error event ends the stream
        yield sse_event(exc.body())
        yield DONE
        return
    finally:
        waiting.cancel()  # a no-op once done; stops the wait if the client left first
    ttft = time.monotonic() - arrival
    async for chunk in stream_events(group, first, renderer, include_usage, prompt_tokens,
                                     lambda tokens, metrics: record.generated(prompt_tokens, tokens, ttft, metrics)):
        yield chunk


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage counts (a prompt shared by n choices counts once, as OpenAI counts it; its
    cached tokens are the most any choice found in the KV cache)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def submit(state: ServerState, prompts: list, params: list, arrival: float) -> RequestGroup:
    """Queue the request's sequences (n choices, or a batch of prompts x n): 429 when full (which
    admission, having held their room, normally prevents)."""
    try:
        return state.scheduler.submit(prompts, params, arrival)
    except QueueFull:
        raise state.admission.queue_full(len(prompts)) from None
    except NotReady as exc:
        raise engine_error(exc) from None


async def respond(
    state: ServerState, group: RequestGroup, renderer: Renderer, stream: bool, include_usage: bool,
    prompt_tokens: int, arrival: float,
) -> Response:
    """The JSON response, or the event stream. A stream starts when the first token exists or after
    `sse_keepalive_s`, whichever comes first: a request refused at once still gets its HTTP status,
    and a long prefill or queue wait sends headers and `: ping` comments, so proxies with idle
    timeouts keep the connection (a failure after that is an error event). Whatever ends this early
    (an error, the client leaving) cancels the request's sequences. The access line
    (`logs.current_request`) learns the counts, TTFT and acceptance."""
    record = current_request() or RequestLog("-")  # a mounted app has no access line: fill a spare
    scheduler = state.scheduler
    waiting = asyncio.ensure_future(first_event(group)) if stream else None
    try:
        if waiting is not None:
            await asyncio.wait({waiting}, timeout=state.settings.sse_keepalive_s)
            if waiting.done():
                waiting.result()  # a failure this early is a plain HTTP error
            events = _events_after(waiting, state.settings.sse_keepalive_s, group, renderer, include_usage,
                                   prompt_tokens, arrival, record)
            return EventStream(events, on_close=lambda: scheduler.cancel(group))
        results, first_time = await collect(group)
    except BaseException:
        if waiting is not None:
            waiting.cancel()
        scheduler.cancel(group)
        raise
    metrics = merged_metrics([r.metrics for r in results])
    counts = usage(prompt_tokens, sum(r.num_tokens for r in results), max(r.cached_tokens for r in results))
    record.generated(prompt_tokens, counts["completion_tokens"], first_time - arrival, metrics)
    return JSONResponse(renderer.response(results, counts, metrics))
