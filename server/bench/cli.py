"""`specserve bench`: load any OpenAI-compatible server (specserve, vLLM, llama.cpp's server, ...) with
streamed chat requests and print what its users would measure.

    specserve bench --base-url http://127.0.0.1:8000 --dataset mixed --num-prompts 40 --concurrency 1 4 8

Several `--base-url`s run one after another with the same workload, and one table compares them.
Each run reads the server's speculative-decoding counters from `/metrics` before and after. Exits 1
when any request failed (the summary lists the errors), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import httpx

from .client import Options, Target, counters_delta, run, spec_counters
from .summary import format_summary, format_table, summarise
from .workload import DATASETS, builtin, load_jsonl


def add_bench_parser(sub) -> argparse.ArgumentParser:
    bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible server (specserve or a peer)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--base-url", action="append", required=True, metavar="URL",
                       help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is dropped); repeat to compare")
    bench.add_argument("--label", action="append", default=None, help="a name per --base-url (default: the URL)")
    bench.add_argument("--model", default=None, help="model name to send (default: each server's first model)")
    bench.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    bench.add_argument("--dataset", default="summarise-edit", choices=DATASETS,
                       help="built-in prompts: text sets, `images` (synthetic pictures), `mixed` (text and images)")
    bench.add_argument("--dataset-path", type=Path, default=None,
                       help="JSONL file of requests instead of --dataset (format: specserve.server.bench.workload)")
    bench.add_argument("--num-prompts", type=int, default=20, help="requests per run (the dataset is cycled)")
    bench.add_argument("--request-rate", type=float, default=math.inf,
                       help="requests per second, Poisson arrivals (default inf: all at once)")
    bench.add_argument("--concurrency", type=int, nargs="+", default=None,
                       help="most requests in flight; several values run one after another (default: no limit)")
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.add_argument("--ignore-eos", action="store_true",
                       help="every request runs to max tokens (sends ignore_eos and min_tokens)")
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    bench.add_argument("--tokenizer", default=None,
                       help="tokenizer (folder or hub id) counting the tokens of servers that stream no usage")
    bench.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    bench.add_argument("--result-json", type=Path, default=None, help="write every summary and request here")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=run_bench)
    return bench


def served_model(target: Target) -> str:
    """The first model a server lists at /v1/models."""
    response = httpx.get(target.base_url + "/v1/models", headers=target.headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def targets(args) -> list[Target]:
    urls = [url.rstrip("/").removesuffix("/v1") for url in args.base_url]
    labels = args.label or urls
    if len(labels) != len(urls):
        raise ValueError(f"{len(labels)} --label values for {len(urls)} --base-url values")
    servers = [Target(url, args.model or "", label, args.api_key) for url, label in zip(urls, labels)]
    return [server if server.model else replace(server, model=served_model(server)) for server in servers]


def options(args) -> Options:
    count = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False).input_ids)

    return Options(args.max_tokens, args.ignore_eos, args.temperature, args.timeout, count)


def run_bench(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.max_tokens < 1 or args.request_rate <= 0 or any(
            c < 1 for c in args.concurrency or []):
        sys.stderr.write("specserve bench: --num-prompts, --max-tokens, --request-rate and --concurrency must be "
                         "positive\n")
        return 2
    try:
        requests = load_jsonl(args.dataset_path) if args.dataset_path else builtin(args.dataset)
        servers = targets(args)
    except (ValueError, OSError, httpx.HTTPError, KeyError, IndexError) as exc:
        sys.stderr.write(f"specserve bench: {exc}\n")
        return 2
    opts, rows, records = options(args), [], []
    for target in servers:
        for concurrency in args.concurrency or [None]:
            load = f"concurrency {concurrency}" if concurrency else "no limit"
            load += "" if math.isinf(args.request_rate) else f", {args.request_rate:g} req/s"
            before = spec_counters(target.base_url, target.headers)
            results, wall = asyncio.run(run(target, requests, args.num_prompts, opts, concurrency=concurrency,
                                            request_rate=args.request_rate, seed=args.seed,
                                            progress=not args.no_progress))
            after = spec_counters(target.base_url, target.headers)
            summary = summarise(results, wall, counters_delta(before, after))
            print(format_summary(f"{target.label}, {load}", summary), flush=True)
            rows.append((target.label, load, summary))
            rate = None if math.isinf(args.request_rate) else args.request_rate
            records.append({"label": target.label, "base_url": target.base_url, "model": target.model,
                            "concurrency": concurrency, "request_rate": rate, "summary": summary,
                            "requests": [vars(r) for r in results]})
    if len(rows) > 1:
        print(format_table(rows))
    if args.result_json:
        args.result_json.write_text(json.dumps(records, indent=2, default=str))
    return 1 if any(s["failed"] for _, _, s in rows) else 0
