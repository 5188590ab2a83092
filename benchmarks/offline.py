"""Offline decoding benchmark, batch 1, greedy: plain HF `generate` (AR), HF's own speculative modes,
and specserve with each drafter, on the same model, prompts and machine, in one process.

    python benchmarks/offline.py --model smollm2-135m --prompts summarise-edit --drafts none ngram
    python benchmarks/offline.py --model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b \
        --prompts code-prose --drafts none ngram qwen2.5-coder-0.5b

Throughput = generated tokens / wall time of the whole request, prefill included. Every method runs
every prompt `--repeats` times (interleaved, so drift in machine load hits all methods alike); the
table reports min / median / max tokens/s over repeats, the speedup of medians over AR, and checks
that each method's output equals AR's token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prompts import PROMPT_SETS
from specserve.server.config import EngineConfig, SamplingParams, TreeConfig
from specserve.server.engine import Engine
from specserve.server.metrics import SpecMetrics
from specserve.server.target import TargetModel, load_model

RESULTS = Path(__file__).parent / "results"


@dataclass
class MethodResult:
    name: str
    throughputs: list[float] = field(default_factory=list)  # tokens/s, one per repeat
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    outputs: list[list[int]] = field(default_factory=list)  # first repeat, per prompt


def hf_methods(target: TargetModel, draft_model, tree: TreeConfig) -> dict:
    model = target.model

    def run(ids, max_new, **kwargs):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new, **kwargs)
        return out[0, ids.shape[1]:].tolist()

    methods = {
        "hf-ar": lambda ids, n: run(ids, n),
        "hf-prompt-lookup": lambda ids, n: run(ids, n, prompt_lookup_num_tokens=tree.depth),
    }
    if draft_model is not None:
        methods["hf-assisted"] = lambda ids, n: run(ids, n, assistant_model=draft_model)
    return methods


def engine_method(engine: Engine, result: MethodResult):
    def run(ids, max_new):
        out = engine.generate(engine.prepare_text(ids[0].tolist()), SamplingParams(max_tokens=max_new))
        result.metrics.merge(out.metrics)
        return out.token_ids

    return run


def build(args) -> tuple[dict, dict[str, MethodResult], Engine]:
    tree = TreeConfig(args.tree_depth, args.tree_top_k, args.tree_nodes)
    base = Engine.from_config(EngineConfig(args.model, dtype=args.dtype, tree=tree, cache_dir=args.cache_dir))
    draft_model = None
    if args.draft_model:
        draft_model = base._load_draft_model(args.draft_model)
    methods = hf_methods(base.target, draft_model, tree)
    results = {name: MethodResult(name) for name in methods}
    for draft in args.drafts:
        config = EngineConfig(args.model, draft=draft, dtype=args.dtype, tree=tree, cache_dir=args.cache_dir)
        engine = Engine(config, base.target, base.tokenizer)
        name = f"specserve-{Path(draft).name}"
        results[name] = MethodResult(name)
        methods[name] = engine_method(engine, results[name])
    return methods, results, base


def measure(methods, results, prompts: list[torch.Tensor], max_new: int, repeats: int) -> None:
    for run in methods.values():  # warm-up: first calls pay for allocations and kernel selection
        run(prompts[0], 8)
    for result in results.values():
        result.metrics = SpecMetrics()
    for repeat in range(repeats):
        for name, run in methods.items():
            tokens, seconds = 0, 0.0
            for ids in prompts:
                start = time.perf_counter()
                out = run(ids, max_new)
                seconds += time.perf_counter() - start
                tokens += len(out)
                if repeat == 0:
                    results[name].outputs.append(out)
            results[name].throughputs.append(tokens / seconds)
            print(f"repeat {repeat} {name}: {tokens / seconds:.2f} tok/s", flush=True)


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> str:
    """'k/n' prompts whose output equals the reference, and where the others first diverge."""
    same = sum(a == b for a, b in zip(outputs, reference))
    diverge = [
        next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        for a, b in zip(outputs, reference) if a != b
    ]
    note = f" (others diverge at token {', '.join(map(str, diverge))})" if diverge else ""
    return f"{same}/{len(reference)}{note}"


def report(args, results: dict[str, MethodResult]) -> str:
    ar = results["hf-ar"]
    ar_median = statistics.median(ar.throughputs)
    peers = [r for n, r in results.items() if n.startswith("hf-") and n != "hf-ar"]
    best_peer = max((statistics.median(r.throughputs) for r in peers), default=ar_median)
    lines = [
        f"# Offline decoding: {args.model}, prompts `{args.prompts}`, {args.dtype}, greedy, batch 1",
        "",
        f"Command: `python benchmarks/offline.py {' '.join(args.argv)}`  ",
        f"{args.max_new_tokens} new tokens max per prompt, {len(ar.outputs)} prompts, {args.repeats} repeats, "
        f"{torch.get_num_threads()} torch threads; tokens/s include prefill. "
        "Mean accepted length includes the bonus token.",
        "",
        "| method | tok/s min | median | max | vs AR | vs best HF peer | mean accepted length | "
        "per-position acceptance | outputs equal to AR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        med = statistics.median(r.throughputs)
        m = r.metrics
        tau = f"{m.mean_accepted_length:.2f}" if m.verify_steps else "-"
        pos = ", ".join(f"{p:.2f}" for p in m.per_position_acceptance) if m.verify_steps else "-"
        same = agreement(r.outputs, ar.outputs)
        lines.append(
            f"| {name} | {min(r.throughputs):.2f} | {med:.2f} | {max(r.throughputs):.2f} | "
            f"{med / ar_median:.2f}x | {med / best_peer:.2f}x | {tau} | {pos} | {same} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--draft-model", default=None, help="draft LM for HF assisted generation")
    parser.add_argument("--drafts", nargs="+", default=["none", "ngram"], help="specserve drafters to run")
    parser.add_argument("--prompts", default="summarise-edit", choices=sorted(PROMPT_SETS))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts of the set")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree-depth", type=int, default=5)
    parser.add_argument("--tree-top-k", type=int, default=4)
    parser.add_argument("--tree-nodes", type=int, default=16)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--name", default=None, help="results file stem")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, results, base = build(args)
    prompts = [
        torch.tensor([base.prepare_chat([{"role": "user", "content": text}]).token_ids])
        for text in PROMPT_SETS[args.prompts][: args.num_prompts]
    ]
    measure(methods, results, prompts, args.max_new_tokens, args.repeats)
    table = report(args, results)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stem = args.name or f"offline-{Path(args.model).name}-{args.prompts}"
    (RESULTS / f"{stem}.md").write_text(table)
    raw = {n: {"throughputs": r.throughputs, "spec": r.metrics.to_dict()} for n, r in results.items()}
    (RESULTS / f"{stem}.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
