"""MSD image-position modes, measured: EAGLE/MSD heads trained the same way, one per `ImageMode`.

    python benchmarks/msd_modes.py --model tiny-vlm --dtype bfloat16 \
        --heads server/store/assets/tiny-vlm-msd /tmp/msd-fused/head /tmp/msd-text_only/head ...

For held-out multimodal description prompts (easy-vqa test images, a wording training never saw)
and held-out text prompts (topics training never saw), at T=0 and T=1 (seeded), batch 1: mean
accepted length (incl. the bonus token), per-position acceptance and walltime speedup over plain
autoregressive decoding (the same engine with no drafter). Speedup = tokens/s of the method over
tokens/s of AR; wall time covers whole requests, prefill and vision encoding included. Methods run
interleaved per prompt, so drift in machine load hits all of them alike. The engines profile their
steps: each row also splits a verify step into draft / verify / other time and gives the ideal and
step-achieved speedups (`step_timing.py`). Writes msd_modes.{json,md,png} into `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import step_timing
import torch
from plots import Panel, save_bar_chart

from specserve.drafting.budget import TreeBudget
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.metrics import SpecMetrics
from specserve.server.training.draft_head.data import chat_prompt
from specserve.server.training.draft_head.prompts import image_prompts, sample_prompts, text_prompts

RESULTS = Path(__file__).parent / "results"


@dataclass
class Cell:
    """One method on one prompt set at one temperature."""

    seconds: float = 0.0
    tokens: int = 0
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def engines(args: argparse.Namespace) -> dict[str, Engine]:
    """AR first, then one engine per head, all sharing one loaded target."""
    tree = TreeBudget(args.tree_depth, args.tree_branching, args.tree_nodes)
    base = Engine.from_config(EngineConfig(model=args.model, dtype=args.dtype, tree=tree, profile=True))
    found = {"ar": base}
    for head in args.heads:
        config = EngineConfig(model=args.model, draft=str(head), dtype=args.dtype, tree=tree, profile=True)
        engine = Engine(config, base.target, base.tokenizer, base.prompts.processor)
        mode = engine.proposer.head.settings.image_mode.value
        if mode in found:
            raise ValueError(f"two heads use image mode {mode!r}; --heads takes one head per mode")
        found[mode] = engine
    return found


def run_set(found: dict[str, Engine], prompts, temperature: float, max_tokens: int) -> dict[str, Cell]:
    cells = {name: Cell() for name in found}
    for index, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=1000 + index)
        for name, engine in found.items():
            started = time.perf_counter()
            out = engine.generate(prompt, params)
            cell = cells[name]
            cell.seconds += time.perf_counter() - started
            cell.tokens += len(out.token_ids)
            cell.metrics.merge(out.metrics)
            cell.outputs.append(out.token_ids)
    return cells


def summarise(cells: dict[str, Cell]) -> dict[str, dict]:
    ar = cells["ar"]
    rows = {}
    for name, cell in cells.items():
        rows[name] = {
            "tokens": cell.tokens, "seconds": round(cell.seconds, 2),
            "tokens_per_second": round(cell.tokens_per_second, 2),
            "speedup": round(cell.tokens_per_second / ar.tokens_per_second, 3),
            "outputs_equal_ar": sum(a == b for a, b in zip(cell.outputs, ar.outputs)),
            **({} if name == "ar" else cell.metrics.to_dict()),
            **step_timing.step_report(cell.metrics, ar.metrics),
        }
    return rows


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [
        "# MSD image-position modes (batch 1)", "",
        f"Target `{args.model}` in {args.dtype}, {results['threads']} CPU thread(s); tree depth "
        f"{args.tree_depth}, branching {args.tree_branching}, {args.tree_nodes} nodes; max {args.max_tokens} "
        "new tokens. Accepted length includes the bonus token; speedup = tokens/s over plain AR "
        "decoding, whole requests (prefill and vision encoding included). At T=0 every output should "
        "equal AR's (bf16 near-ties aside); at T=1 methods draw different random numbers, so outputs "
        "differ by design (the tests check that the distributions match).  ",
        f"Heads: {', '.join(str(h) for h in args.heads)}.  ",
        step_timing.NOTE, "",
        "| prompts | T | method | mean accepted length | acceptance per position | speedup | "
        + " | ".join(step_timing.COLUMNS) + " | tok/s | outputs == AR |",
        "|" + "---|" * (8 + len(step_timing.COLUMNS)),
    ]
    for key, rows in results["sets"].items():
        prompts, temp = key.split("@")
        for name, row in rows.items():
            tau = row.get("mean_accepted_length", 1.0)
            per_pos = " ".join(f"{p:.2f}" for p in row.get("per_position_acceptance", []))
            count = results["prompt_counts"][prompts]
            same = f"{row['outputs_equal_ar']}/{count}" if float(temp) == 0 else "sampled"
            lines.append(f"| {prompts} | {temp} | {name} | {tau:.2f} | {per_pos} | {row['speedup']:.2f}x | "
                         + " | ".join(step_timing.cells(row))
                         + f" | {row['tokens_per_second']:.1f} | {same} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, results: dict, args: argparse.Namespace) -> None:
    """Mean accepted length and speedup of each mode, one bar per prompt set and temperature."""
    modes = [m for m in next(iter(results["sets"].values())) if m != "ar"]

    def panel(metric: str, title: str) -> Panel:
        series = {key.replace("@", ", T="): [rows[mode][metric] for mode in modes]
                  for key, rows in results["sets"].items()}
        return Panel(title, modes, series, baseline=1.0)

    save_bar_chart(path, f"MSD image-position modes: {Path(args.model).name}, {args.dtype}",
                   [panel("mean_accepted_length", "mean accepted length"), panel("speedup", "walltime speedup vs AR")])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vlm")
    parser.add_argument("--heads", nargs="+", required=True, help="head folders, one per image mode")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--image-prompts", type=int, default=12)
    parser.add_argument("--text-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--tree-depth", type=int, default=6)
    parser.add_argument("--tree-branching", "--tree-top-k", dest="tree_branching", type=int, default=4)
    parser.add_argument("--tree-nodes", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--name", default="msd_modes", help="results file stem")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    found = engines(args)
    base = found["ar"]
    prompt_sets = {
        "images": [chat_prompt(base, s) for s in image_prompts(True, args.image_prompts, args.seed)],
        "text": [chat_prompt(base, s) for s in sample_prompts(text_prompts(True), args.text_prompts, args.seed)],
    }
    for engine in found.values():  # warm-up: first calls pay for allocations and kernel selection
        engine.generate(prompt_sets["images"][0], SamplingParams(max_tokens=8))
    results = {"args": vars(args), "threads": torch.get_num_threads(),
               "prompt_counts": {k: len(v) for k, v in prompt_sets.items()}, "sets": {}}
    for temperature in args.temperatures:
        for set_name, prompts in prompt_sets.items():
            cells = run_set(found, prompts, temperature, args.max_tokens)
            results["sets"][f"{set_name}@{temperature:g}"] = summarise(cells)
            print(f"{set_name} T={temperature:g}: " + ", ".join(
                f"{k} tau={v.get('mean_accepted_length', 1):.2f} x{v['speedup']:.2f}"
                for k, v in results["sets"][f"{set_name}@{temperature:g}"].items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")  # str: Path args
    (args.out / f"{args.name}.md").write_text(markdown(results, args))
    plot(args.out / f"{args.name}.png", results, args)
    return results


if __name__ == "__main__":
    main()
