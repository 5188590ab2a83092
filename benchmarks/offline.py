"""Offline decoding benchmark, batch 1, greedy: plain HF `generate` (AR), HF's own speculative modes,
and specserve with each drafter, on the same model, prompts and machine, in one process.

    python benchmarks/offline.py --model smollm2-135m --prompts summarise-edit --drafts none ngram
    python benchmarks/offline.py --model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b \
        --prompts code-prose --drafts none ngram qwen2.5-coder-0.5b
    python benchmarks/offline.py --model tiny-vlm --prompts images --drafts none ngram tiny-vlm-msd
    python benchmarks/offline.py --model smollm2-135m --prompts repeated --drafts none ngram suffix self:auto

Throughput = generated tokens / wall time of the whole request, prefill included. Every method runs
every prompt `--repeats` times (interleaved, so drift in machine load hits all methods alike); the
table reports min / median / max tokens/s over repeats, the speedup of medians over AR, and checks
that each method's output equals AR's token for token. The specserve engines profile their steps:
the table splits a verify step into draft / verify / other time and sets the measured speedup next to
two bounds from those times (`step_timing.py`); they need `none` among `--drafts`. `--prompts images`
asks a vision-language model (tiny-vlm) held-out description prompts on easy-vqa test images.
The suffix drafter's store of past outputs is emptied before every repeat, so a repeat never drafts
from its own previous answers to the same prompts (only from the earlier prompts of the same repeat).
A self-drafting row names the layers it drafts with (`self:auto`: the calibration's choice, logged).
The HF rows run on the engine's own model, with its linear weights packed as the engine packs them
(`kernels.cpu_linear`), so "equal to AR" compares the same model; `--hf-torch-kernels` adds
`hf-ar-torch-kernels`: HF `generate` on a second copy with torch's own linear layers, what HF gives a
user (bfloat16 on a CPU without native bfloat16: torch's matmul, not fbgemm's).
Writes `<name>.md`, `.json` and `.png` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import step_timing
import torch
from plots import Panel, save_bar_chart

from specserve.drafting.budget import TreeBudget, TreeMode
from specserve.drafting.draft_model import DraftModelProposer
from specserve.drafting.suffix import SuffixProposer
from specserve.server.bench.prompts import PROMPT_SETS
from specserve.server.engine import Engine, load_draft_model
from specserve.server.engine.config import DRAFT_QUANTIZATIONS, EngineConfig, SamplingParams
from specserve.server.engine.drafters import SELF_PREFIX
from specserve.server.engine.loading import load_adapter
from specserve.server.engine.metrics import SpecMetrics
from specserve.server.engine.outputs import PromptInput, image_tensors
from specserve.server.engine.target import TargetModel
from specserve.server.training.draft_head.data import chat_prompt
from specserve.server.training.draft_head.prompts import PromptSpec, image_prompts

RESULTS = Path(__file__).parent / "results"
IMAGE_SET = "images"  # held-out description prompts on easy-vqa test images, for tiny-vlm
IMAGE_PROMPTS, IMAGE_SEED = 5, 1
AR_DRAFT = "specserve-none"  # the engine's own plain decoding: t_ar of the speedup bounds
INT8 = "-int8"  # name suffix of the methods drafting with the int8 draft LM


@dataclass
class MethodResult:
    name: str
    throughputs: list[float] = field(default_factory=list)  # tokens/s, one per repeat
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    outputs: list[list[int]] = field(default_factory=list)  # first repeat, per prompt
    note: str = ""  # shown under the table


def hf_methods(target: TargetModel, assistants: dict[str, torch.nn.Module], tree: TreeBudget) -> dict:
    """HF `generate` plain, with prompt lookup, and with each assistant model (name suffix -> model)."""
    model = target.model

    def run(prompt: PromptInput, max_new, **kwargs):
        ids = torch.tensor([prompt.token_ids], device=target.device)
        # the engine's own input: processor-expanded ids, the processor's image tensors and the token
        # types some families need to place them (M-RoPE positions, Gemma 3's bidirectional images)
        if prompt.images:
            kwargs |= image_tensors(prompt.images, target.device, target.dtype) | target.adapter.token_types(ids)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new, **kwargs)
        return out[0, ids.shape[1]:].tolist()

    methods = {"hf-ar": lambda prompt, n: run(prompt, n)}
    # HF prompt lookup fails on LLaVA (transformers 5: "Image features and image tokens do not match"):
    # it copies the prompt's image placeholders into its candidates, which its first forward runs with
    # the prompt and the pixels, so there are more placeholders than image features.
    if not target.is_multimodal:
        methods["hf-prompt-lookup"] = lambda prompt, n: run(prompt, n, prompt_lookup_num_tokens=tree.depth)
    for suffix, assistant in assistants.items():
        methods[f"hf-assisted{suffix}"] = lambda prompt, n, a=assistant: run(prompt, n, assistant_model=a)
    return methods


def engine_method(engine: Engine, result: MethodResult):
    def run(prompt: PromptInput, max_new):
        out = engine.generate(prompt, SamplingParams(max_tokens=max_new))
        result.metrics.merge(out.metrics)
        return out.token_ids

    return run


def build(args) -> tuple[dict, dict[str, MethodResult], Engine, list[SuffixProposer]]:
    tree = TreeBudget(args.tree_depth, args.tree_branching, args.tree_nodes, TreeMode(args.tree_mode))
    base = Engine.from_config(EngineConfig(args.model, dtype=args.dtype, tree=tree, cache_dir=args.cache_dir))
    assistants = {}
    if args.draft_model:
        assistants[""] = load_draft_model(args.draft_model, base.config)
        if args.draft_quantization == "int8":
            int8 = replace(base.config, draft_quantization="int8")
            assistants[INT8] = load_draft_model(args.draft_model, int8)
    methods = hf_methods(base.target, assistants, tree)
    if args.hf_torch_kernels:
        unpacked = TargetModel(load_adapter(args.model, args.cache_dir, args.dtype, "cpu", prepack=False)[1])
        methods["hf-ar-torch-kernels"] = hf_methods(unpacked, {}, tree)["hf-ar"]
    results = {name: MethodResult(name) for name in methods}
    engines = {f"specserve-{Path(draft).name}": (draft, None) for draft in args.drafts}
    if INT8 in assistants:  # the same int8 model as HF's assistant, shared
        engines[f"specserve-{Path(args.draft_model).name}{INT8}"] = (
            args.draft_model, DraftModelProposer(assistants[INT8], tree))
    stores = []
    for name, (draft, proposer) in engines.items():
        # no prefix caching: every method prefills every prompt (HF's generate keeps nothing between calls)
        config = EngineConfig(args.model, draft=draft, dtype=args.dtype, tree=tree, cache_dir=args.cache_dir,
                              profile=True, prefix_caching=False)
        engine = Engine(config, base.target, base.tokenizer, base.prompts.processor, proposer)
        results[name] = MethodResult(name)
        methods[name] = engine_method(engine, results[name])
        if draft.startswith(SELF_PREFIX):
            results[name].note = (f"{name} drafts with {engine.proposer.model.config.num_hidden_layers} of "
                                  f"{base.target.config.num_hidden_layers} layers")
        if isinstance(engine.proposer, SuffixProposer):
            stores.append(engine.proposer)
    return methods, results, base, stores


def load_prompts(engine: Engine, name: str, count: int | None) -> list[PromptInput]:
    """The first `count` prompts of a text set, or `count` held-out image prompts, as chat turns."""
    if name == IMAGE_SET:
        specs = image_prompts(True, count or IMAGE_PROMPTS, IMAGE_SEED)
    else:
        specs = [PromptSpec(text) for text in PROMPT_SETS[name][:count]]
    return [chat_prompt(engine, spec) for spec in specs]


def measure(methods, results, prompts: list[PromptInput], max_new: int, repeats: int,
            stores: list[SuffixProposer]) -> None:
    for run in methods.values():  # warm-up: first calls pay for allocations and kernel selection
        run(prompts[0], 8)
    for result in results.values():
        result.metrics = SpecMetrics()
    for repeat in range(repeats):
        for store in stores:  # every repeat starts cold: no drafting from the same prompts' answers
            store.reset()
        for name, run in methods.items():
            tokens, seconds = 0, 0.0
            for prompt in prompts:
                start = time.perf_counter()
                out = run(prompt, max_new)
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


def step_reports(results: dict[str, MethodResult]) -> dict[str, dict]:
    """Per method, its profiled step split and speedup bounds ({} for the HF methods)."""
    ar = results[AR_DRAFT].metrics if AR_DRAFT in results else None
    return {name: step_timing.step_report(r.metrics, ar) for name, r in results.items()}


def report(args, results: dict[str, MethodResult], steps: dict[str, dict]) -> str:
    ar = results["hf-ar"]
    ar_median = statistics.median(ar.throughputs)
    peers = [r for n, r in results.items() if n.startswith("hf-") and n != "hf-ar"]
    best_peer = max((statistics.median(r.throughputs) for r in peers), default=ar_median)
    columns = ["method", "tok/s min", "median", "max", "vs best HF peer", "vs AR", *step_timing.COLUMNS,
               "mean accepted length", "per-position acceptance", "outputs equal to AR"]
    lines = [
        f"# Offline decoding: {args.model}, prompts `{args.prompts}`, {args.dtype}, greedy, batch 1",
        "",
        f"Command: `python benchmarks/offline.py {' '.join(args.argv)}`  ",
        f"{args.max_new_tokens} new tokens max per prompt, {len(ar.outputs)} prompts, {args.repeats} repeats, "
        f"{torch.get_num_threads()} torch threads; tokens/s include prefill; vs AR = measured speedup of "
        "median tokens/s over HF `generate`. Mean accepted length includes the bonus token.  ",
        step_timing.NOTE,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for name, r in results.items():
        med = statistics.median(r.throughputs)
        m = r.metrics
        tau = f"{m.mean_accepted_length:.2f}" if m.verify_steps else "-"
        pos = ", ".join(f"{p:.2f}" for p in m.per_position_acceptance) if m.verify_steps else "-"
        row = [name, f"{min(r.throughputs):.2f}", f"{med:.2f}", f"{max(r.throughputs):.2f}",
               f"{med / best_peer:.2f}x", f"{med / ar_median:.2f}x", *step_timing.cells(steps[name]),
               tau, pos, agreement(r.outputs, ar.outputs)]
        lines.append("| " + " | ".join(row) + " |")
    notes = [r.note for r in results.values() if r.note]
    if "specserve-suffix" in results and "specserve-ngram" in results:
        ratio = statistics.median(results["specserve-suffix"].throughputs) / statistics.median(
            results["specserve-ngram"].throughputs)
        notes.append(f"specserve-suffix / specserve-ngram (median tokens/s): {ratio:.2f}x")
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def plot(path: Path, title: str, results: dict[str, MethodResult], steps: dict[str, dict]) -> None:
    """Tokens/s of every method; the speedup bounds next to the measured speedup of each specserve one."""
    medians = {name: statistics.median(r.throughputs) for name, r in results.items()}
    throughput = Panel(
        "tokens/s", list(results), {"median, min-max over repeats": list(medians.values())},
        ranges={"median, min-max over repeats": [(min(r.throughputs), max(r.throughputs)) for r in results.values()]},
    )
    profiled = [name for name, step in steps.items() if step]
    speedup = Panel("speedup", profiled, {
        "ideal (steps without overhead)": [steps[n]["ideal_speedup"] for n in profiled],
        "step-achieved": [steps[n]["step_speedup"] for n in profiled],
        "measured (vs HF AR)": [medians[n] / medians["hf-ar"] for n in profiled],
    }, baseline=1.0)
    save_bar_chart(path, title, [throughput, speedup])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--draft-model", default=None, help="draft LM for HF assisted generation")
    parser.add_argument("--draft-quantization", default="none", choices=DRAFT_QUANTIZATIONS,
                        help="int8: also run --draft-model as a dynamic int8 draft LM, in HF assisted "
                             "generation and in specserve (CPU only)")
    parser.add_argument("--drafts", nargs="+", default=["none", "ngram"], help="specserve drafters to run")
    parser.add_argument("--prompts", default="summarise-edit", choices=[*sorted(PROMPT_SETS), IMAGE_SET])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=None,
                        help=f"use the first N prompts of a text set; N images (default {IMAGE_PROMPTS})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree-depth", type=int, default=5)
    parser.add_argument("--tree-branching", "--tree-top-k", dest="tree_branching", type=int, default=4)
    parser.add_argument("--tree-nodes", type=int, default=16)
    parser.add_argument("--tree-mode", default=TreeMode.DYNAMIC.value, choices=[m.value for m in TreeMode],
                        help="tree shape of the model drafters (n-gram and suffix propose their trie; "
                             "chain: one path)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--hf-torch-kernels", action="store_true",
                        help="also run HF generate on a copy of the model with torch's own linear layers")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("specserve").setLevel(logging.INFO)  # the calibrations' choices (self:auto, step costs)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, results, base, stores = build(args)
    prompts = load_prompts(base, args.prompts, args.num_prompts)
    measure(methods, results, prompts, args.max_new_tokens, args.repeats, stores)
    steps = step_reports(results)
    table = report(args, results, steps)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"offline-{Path(args.model).name}-{args.prompts}"
    (args.out / f"{stem}.md").write_text(table)
    raw = {n: {"throughputs": r.throughputs, "spec": r.metrics.to_dict(), "step": steps[n], "note": r.note}
           for n, r in results.items()}
    (args.out / f"{stem}.json").write_text(json.dumps(raw, indent=2))
    plot(args.out / f"{stem}.png", f"{Path(args.model).name}, prompts {args.prompts}, {args.dtype}", results, steps)
    return raw


if __name__ == "__main__":
    main()
