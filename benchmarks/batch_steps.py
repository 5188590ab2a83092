"""Batched engine steps in-process: how output tokens/s grows with the batch, per drafter and dtype.

    python benchmarks/batch_steps.py --model smollm2-135m --drafts none ngram --dtypes float32 bfloat16 --threads 1

`--prepack off on` runs each float32 engine both ways (`EngineConfig.prepack_weights`: the target's
linear weights as loaded, or reordered for oneDNN at load, the default).

For each (dtype, drafter) one engine; for each batch size B, B requests (greedy, `ignore_eos`, the
`--prompts` set in turn) are started and prefilled, then every turn steps all of them together
(`Engine.step_batch`) until the first finishes. Reported per B: ms per turn (and of it, drafting),
output tokens/s over the batch, tokens per row per turn (mean accepted length incl. bonus), draft
nodes verified per row per turn (after the batch planner's cut), and the verify-forward cost curve the
planner measured at load (ms by tokens). No HTTP, no scheduler: the engine's own batching, isolated.

`--requests N` adds a closed loop per B: N requests, at most B at a time, each one's place taken by
the next as soon as it finishes (continuous batching, as a server with B busy clients runs; a
newcomer's prefill joins the turn). Reported: output tokens/s over the whole run; over the turns
with all B places busy ("full"); the seconds of the tail, the turns with fewer than B rows once no
request is left to start (requests that drafted poorly finish last and run nearly alone, which plain
decoding, whose requests of equal length move in lockstep, does not do); and, among the full turns,
the share that drafted and the tokens/s of drafting turns and of plain ones. Every engine is loaded
at once and their loops of one batch size run round after round (`--rounds`, alternating order;
the table gives the means), so a drift of the machine's speed hits them alike.

Writes batch-steps-<model>.{md,json} (or `--name`.{md,json}) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from specserve.server.bench.prompts import PROMPT_SETS
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.planner import GoodputPlanner

RESULTS = Path(__file__).parent / "results"


def run_batch(engine: Engine, texts: list[str], batch: int, max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seqs = [engine.start(engine.prepare_chat([{"role": "user", "content": texts[i % len(texts)]}]), params)
            for i in range(batch)]
    while any(not seq.prefilled for seq in seqs):
        engine.step_batch(seqs)
    before = [(seq.metrics.proposed_draft_tokens, len(seq.output_ids)) for seq in seqs]
    drafting = seqs[0].metrics.draft_seconds  # every row waits for the whole batch's drafting
    turns, start = 0, time.perf_counter()
    while not any(seq.finished for seq in seqs):
        engine.step_batch(seqs)
        turns += 1
    seconds = time.perf_counter() - start
    tokens = sum(len(seq.output_ids) - b[1] for seq, b in zip(seqs, before))
    drafted = sum(seq.metrics.proposed_draft_tokens - b[0] for seq, b in zip(seqs, before))
    for seq in seqs:
        engine.release(seq)
    draft_ms = 1000 * (seqs[0].metrics.draft_seconds - drafting) / turns
    return {"ms_per_turn": 1000 * seconds / turns, "draft_ms_per_turn": draft_ms, "tokens_per_s": tokens / seconds,
            "tokens_per_row_turn": tokens / (turns * batch), "drafted_per_row_turn": drafted / (turns * batch)}


def run_closed_loop(engine: Engine, texts: list[str], batch: int, requests: int, max_tokens: int) -> dict:
    """`requests` requests, at most `batch` at a time, each finished one replaced at once (module docstring)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    waiting, active, tokens = list(range(requests)), [], 0
    full = {True: [0, 0.0, 0], False: [0, 0.0, 0]}  # drafted -> [tokens, seconds, turns] of full turns
    tail_seconds, start = 0.0, time.perf_counter()
    while waiting or active:
        while waiting and len(active) < batch:
            text = texts[waiting.pop(0) % len(texts)]
            active.append(engine.start(engine.prepare_chat([{"role": "user", "content": text}]), params))
        before = [(len(seq.output_ids), seq.metrics.proposed_draft_tokens) for seq in active]
        turn = time.perf_counter()
        engine.step_batch(active)
        seconds = time.perf_counter() - turn
        emitted = sum(len(seq.output_ids) - b[0] for seq, b in zip(active, before))
        tokens += emitted
        if len(active) == batch:
            drafted = any(seq.metrics.proposed_draft_tokens > b[1] for seq, b in zip(active, before))
            full[drafted][0] += emitted
            full[drafted][1] += seconds
            full[drafted][2] += 1
        elif not waiting:
            tail_seconds += seconds
        for seq in [seq for seq in active if seq.finished]:
            active.remove(seq)
            engine.release(seq)
    seconds = time.perf_counter() - start
    full_turns = full[True][2] + full[False][2]
    return {
        "tokens_per_s": tokens / seconds,
        "full_tokens_per_s": (full[True][0] + full[False][0]) / max(full[True][1] + full[False][1], 1e-9),
        "tail_s": tail_seconds, "seconds": seconds,
        "full_drafted_share": full[True][2] / max(full_turns, 1),
        "full_drafted_tokens_per_s": full[True][0] / full[True][1] if full[True][2] else None,
        "full_plain_tokens_per_s": full[False][0] / full[False][1] if full[False][2] else None,
    }


def run_engine(args, engine: Engine) -> dict:
    """Every batch size on one engine, and the verify cost curve its planner measured at load."""
    costs = engine.planner.costs if isinstance(engine.planner, GoodputPlanner) else None
    return {
        "costs_ms": {t: s * 1000 for t, s in zip(costs.tokens, costs.seconds)} if costs else {},
        "batches": {str(b): run_batch(engine, PROMPT_SETS[args.prompts], b, args.max_tokens) for b in args.batches},
    }


def run_closed_loops(args, engines: dict) -> dict:
    """{config: {batch: closed-loop figures, averaged over `--rounds`}}: every engine's loop of a batch
    size runs before the next round's, in alternating order, so a drift of the machine's speed hits
    them alike."""
    rounds: dict = {config: {str(b): [] for b in args.batches} for config in engines}
    for batch in args.batches:
        for index in range(args.rounds):
            for config in (list(engines) if index % 2 == 0 else list(engines)[::-1]):
                rounds[config][str(batch)].append(run_closed_loop(
                    engines[config], PROMPT_SETS[args.prompts], batch, args.requests, args.max_tokens))
    return {config: {batch: mean_figures(runs) for batch, runs in batches.items()}
            for config, batches in rounds.items()}


def mean_figures(runs: list[dict]) -> dict:
    """The mean of each figure over rounds (a figure some round lacks: the mean of those that have it)."""
    def mean(values: list) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    return {key: mean([run[key] for run in runs]) for key in runs[0]} | {"rounds": len(runs)}


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(args, runs: dict) -> str:
    lines = [
        f"# Batched engine steps: {args.model}, in-process", "",
        f"Command: `python benchmarks/batch_steps.py {' '.join(args.argv)}`  ",
        f"`{args.prompts}` prompts, {args.max_tokens} tokens per request, greedy, torch threads "
        f"{args.threads}. Tokens/s over the whole batch; per row and turn: tokens emitted (incl. bonus) and "
        "draft nodes verified after the planner's cut. Drafting ms/turn: the batch's proposals and one row's "
        "commit (engine profiling on).", "",
        "| dtype | prepack | drafter | batch | ms/turn | drafting ms/turn | output tok/s | vs batch 1 | "
        "tokens/row/turn | drafted/row/turn |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (dtype, prepack, draft), run in runs.items():
        first = run["batches"][str(args.batches[0])]["tokens_per_s"]
        for batch, r in run["batches"].items():
            lines.append(f"| {dtype} | {prepack} | {draft} | {batch} | {r['ms_per_turn']:.0f} | "
                         f"{r['draft_ms_per_turn']:.0f} | {r['tokens_per_s']:.1f} | "
                         f"{r['tokens_per_s'] / first:.2f}x | {r['tokens_per_row_turn']:.2f} | "
                         f"{r['drafted_per_row_turn']:.1f} |")
    if args.requests:
        lines += ["", f"Closed loop: {args.requests} requests, at most `batch` at a time, each finished one replaced "
                  f"at once; the mean of {args.rounds} interleaved round(s). Full turns: all places busy; tail: turns "
                  "with fewer rows once none is left to start.", "",
                  "| dtype | prepack | drafter | batch | output tok/s | full-turn tok/s | tail s / run s | "
                  "full turns drafted | drafting turns tok/s | plain turns tok/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for (dtype, prepack, draft), run in runs.items():
            for batch, r in run["closed_loop"].items():
                lines.append(f"| {dtype} | {prepack} | {draft} | {batch} | {r['tokens_per_s']:.1f} | "
                             f"{r['full_tokens_per_s']:.1f} | {r['tail_s']:.1f} / {r['seconds']:.1f} | "
                             f"{r['full_drafted_share']:.0%} | {rate(r['full_drafted_tokens_per_s'])} | "
                             f"{rate(r['full_plain_tokens_per_s'])} |")
    lines += ["", "Verify-forward cost measured at load (ms by tokens), per dtype:", ""]
    for (dtype, prepack, draft), run in runs.items():
        if run["costs_ms"]:
            curve = ", ".join(f"{t}: {ms:.0f}" for t, ms in run["costs_ms"].items())
            lines.append(f"- {dtype}, prepack {prepack} ({draft}): {curve}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafts", nargs="+", default=["none", "ngram"])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--prepack", nargs="+", choices=["off", "on"], default=["on"],
                        help="the target's linear weights as loaded and/or reordered for oneDNN (CPU float32)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", default="summarise-edit", choices=sorted(PROMPT_SETS))
    parser.add_argument("--requests", type=int, default=0,
                        help="also run each batch size as a closed loop of this many requests (0: no)")
    parser.add_argument("--rounds", type=int, default=1, help="closed-loop rounds per engine and batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=2048, help="KV slot length (all batches must fit)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--name", default=None, help="results file stem (default: batch-steps-<model>)")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    torch.set_num_threads(args.threads)
    engines = {(dtype, prepack, draft): Engine.from_config(EngineConfig(
                   args.model, draft=draft, dtype=dtype, profile=True, max_num_seqs=max(args.batches),
                   max_model_len=args.max_model_len, prepack_weights=prepack == "on"))
               for dtype in args.dtypes for prepack in (args.prepack if dtype == "float32" else ["-"])
               for draft in args.drafts}
    runs = {config: run_engine(args, engine) for config, engine in engines.items()}
    if args.requests:
        for config, loops in run_closed_loops(args, engines).items():
            runs[config]["closed_loop"] = loops
    table = report(args, runs)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or f"batch-steps-{Path(args.model).name}")
    stem.with_suffix(".md").write_text(table)
    named = {f"{dtype}/prepack-{prepack}/{draft}": run for (dtype, prepack, draft), run in runs.items()}
    stem.with_suffix(".json").write_text(json.dumps(named, indent=2))
    return runs


if __name__ == "__main__":
    main()
