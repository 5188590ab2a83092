"""Sending a workload to an OpenAI-compatible server: streamed chat requests that arrive as a Poisson
process (`request_rate`) and/or with at most `concurrency` in flight, each timed per chunk; and the
speculative-decoding counters of the server's `/metrics` (specserve's and vLLM's names).

Times per request: TTFT = sent -> first chunk with a choice; ITL = gaps between such chunks (a chunk
carries every token of one engine step, so several when drafts are accepted); e2e = sent -> end of
the stream; TPOT = (e2e - TTFT) / (tokens - 1).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from .workload import BenchRequest

SPEC_COUNTERS = {"drafts": "vllm:spec_decode_num_drafts", "draft_tokens": "vllm:spec_decode_num_draft_tokens",
                 "accepted_tokens": "vllm:spec_decode_num_accepted_tokens"}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclass(frozen=True)
class Target:
    """A server to benchmark: its root URL (`http://host:port`), the model name to send, a label."""

    base_url: str
    model: str
    label: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class Options:
    max_tokens: int = 128
    # Every request runs to its max_tokens: sends `ignore_eos` (specserve, vLLM) and `min_tokens`
    # (vLLM, llama.cpp); each server ignores the field it does not know.
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout: float = 600.0  # seconds per request
    # Counts the tokens of a stream without usage (llama.cpp's server streams none), from its text.
    count_tokens: Callable[[str], int] | None = None


@dataclass
class RequestResult:
    item: int  # index into the workload
    error: str | None = None
    sent: float = 0.0  # seconds from the start of the run to this request's start
    ttft: float | None = None
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int | None = None  # from usage; None when the server streams none
    verify_steps: int = 0  # from specserve's finishing chunk (`spec_decode`); 0 elsewhere
    drafted_steps: int = 0  # of those, steps that verified a draft token (what /metrics counts as drafts)
    accepted: int = 0  # accepted draft tokens, likewise


def request_body(target: Target, request: BenchRequest, options: Options) -> dict:
    max_tokens = request.max_tokens or options.max_tokens
    body = {"model": target.model, "messages": request.messages, "max_tokens": max_tokens,
            "temperature": options.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if options.ignore_eos:
        body |= {"ignore_eos": True, "min_tokens": max_tokens}
    return body


async def stream_one(client: httpx.AsyncClient, target: Target, request: BenchRequest, options: Options,
                     item: int) -> RequestResult:
    """One streamed chat request; a failure is recorded in the result, never raised."""
    result, text = RequestResult(item), []
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=request_body(target, request, options),
                                 headers=target.headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue  # SSE comments (keep-alives), blank lines, the end marker
                now, chunk = time.perf_counter(), json.loads(line[len("data: "):])
                if "error" in chunk:  # the server's way to fail a stream it has started
                    raise ValueError(f"stream error: {chunk['error'].get('message')}")
                if chunk.get("choices"):
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    text.append(chunk["choices"][0].get("delta", {}).get("content") or "")
                    if chunk["choices"][0].get("finish_reason") and (spec := chunk.get("spec_decode")):
                        result.verify_steps, result.accepted = spec["verify_steps"], spec["accepted_draft_tokens"]
                        result.drafted_steps = spec.get("drafted_steps", 0)  # older servers: absent
                if usage := chunk.get("usage"):
                    result.tokens, result.prompt_tokens = usage["completion_tokens"], usage.get("prompt_tokens")
        result.e2e = time.perf_counter() - start
        if not result.tokens and text and options.count_tokens is not None:
            result.tokens = options.count_tokens("".join(text))
        if result.ttft is None or result.tokens == 0:
            hint = "" if options.count_tokens else " (a server that streams no usage needs --tokenizer)"
            raise ValueError("the stream ended without tokens or usage" + hint)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run(target: Target, requests: list[BenchRequest], num_prompts: int, options: Options, *,
              concurrency: int | None = None, request_rate: float = math.inf, seed: int = 0,
              progress: bool = False) -> tuple[list[RequestResult], float]:
    """Send `num_prompts` requests (the workload cycled): the i-th is issued after an exponential gap
    of mean 1/`request_rate` (all at once when infinite) and starts when fewer than `concurrency` are
    in flight. Returns the results in issue order and the wall time of the whole run."""
    rng = random.Random(seed)
    in_flight = asyncio.Semaphore(concurrency or num_prompts)
    bar = tqdm(total=num_prompts, desc=target.label, unit="req", disable=not progress, leave=False)
    limits = httpx.Limits(max_connections=concurrency or num_prompts)

    async with httpx.AsyncClient(base_url=target.base_url, timeout=options.timeout, limits=limits) as client:
        async def one(item: int) -> RequestResult:
            async with in_flight:
                sent = time.perf_counter() - start
                try:
                    request = stream_one(client, target, requests[item % len(requests)], options, item)
                    result = await asyncio.wait_for(request, options.timeout)
                except TimeoutError:
                    result = RequestResult(item, error=f"TimeoutError: no answer within {options.timeout} s")
                result.sent = sent
            bar.update()
            return result

        start, tasks = time.perf_counter(), []
        for item in range(num_prompts):
            if item and math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(one(item)))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    bar.close()
    return list(results), wall


def scrape_metrics(base_url: str, headers: dict[str, str] | None = None) -> str | None:
    """The Prometheus text of `base_url/metrics`; None when the server has none (or cannot be reached)."""
    try:
        response = httpx.get(base_url + "/metrics", headers=headers, timeout=30)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def spec_counters(base_url: str, headers: dict[str, str] | None = None) -> dict | None:
    """The speculative-decoding counters on `base_url/metrics` (see `parse_spec_counters`)."""
    return parse_spec_counters(scrape_metrics(base_url, headers))


def parse_spec_counters(metrics: str | None) -> dict | None:
    """The speculative-decoding counters in a `/metrics` text, summed over models: drafts, draft and
    accepted tokens, accepted tokens per position. None when there are no such metrics."""
    if metrics is None:
        return None
    counters, per_position, found = dict.fromkeys(SPEC_COUNTERS, 0.0), {}, False
    keys = {name: key for key, name in SPEC_COUNTERS.items()}
    for family in text_string_to_metric_families(metrics):  # a family is listed before its first sample
        totals = [sample for sample in family.samples if sample.name == family.name + "_total"]
        if family.name in keys:
            found = True
            counters[keys[family.name]] += sum(sample.value for sample in totals)
        elif family.name == PER_POSITION:
            for sample in totals:
                position = int(sample.labels["position"])
                per_position[position] = per_position.get(position, 0.0) + sample.value
    if not found:
        return None
    return counters | {"per_position": [per_position.get(i, 0.0) for i in range(max(per_position, default=-1) + 1)]}


def counters_delta(before: dict | None, after: dict | None) -> dict | None:
    """What a run added to the counters (None unless both scrapes found them)."""
    if before is None or after is None:
        return None
    positions = max(len(before["per_position"]), len(after["per_position"]))

    def padded(values: list[float]) -> list[float]:
        return values + [0.0] * (positions - len(values))

    return {key: after[key] - before[key] for key in SPEC_COUNTERS} | {
        "per_position": [a - b for a, b in zip(padded(after["per_position"]), padded(before["per_position"]))]}
