"""Where one verify step's time goes: matmuls against everything else, and the weight bandwidth it reaches.

    python benchmarks/profile_step.py --model smollm2-135m --dtypes float32 --prepack off on \
        --attention sdpa grouped
    python benchmarks/profile_step.py --model smollm2-135m --prepack on --attention grouped \
        --quantization none int8 int4 --name profile-step-smollm2-135m-quantized

For each dtype and shape BxN (B sequences, each verifying a chain of N nodes after `--prefix` cached
tokens), or a batch of chains of different sizes written as their sizes joined by "+" (6+1+1+6: padded
to the longest, as the engine stacks trees), the engine's own verify call (`TargetModel.verify`:
decoder and LM head over every node, on the slot KV cache) runs `--steps` times timed, the
configurations' steps interleaved (every configuration is loaded at once, so a drift of the machine's
speed hits them alike), then `--steps` times under the torch profiler, with the linear weights as
loaded (`--prepack off`) and packed (`on`, the engine's default: reordered for oneDNN in float32 and
native bfloat16, fbgemm's half-precision GEMM for bfloat16 on a CPU without it; `kernels.cpu_linear`),
and with transformers' `sdpa` attention, the engine's `grouped`
one (keys and values read once per query-head group, `kernels.grouped_attention`; with it a batch of
chains of different sizes runs packed, without its padding nodes, once a third of it is padding, where
`sdpa` runs them padded) or `kernel` (the same with its verify calls on `kernels.cpu_attention`'s
kernel, packed whenever there is padding), and
with the weights in float or weight-only int8 / int4 (`--quantization`, `kernels.weight_only`). The
wall time per step splits into:

- matmul: the self time of aten's matrix products (every linear layer and the LM head);
- attention: the scaled-dot-product attention ops, or the engine's CPU attention kernel;
- other ops: every other aten op (norms, rotary embeddings, KV writes, casts, adds);
- outside ops: wall time spent in no aten op at all (Python: module calls, transformers' glue).

Weight MB is what one step must read at least: every linear weight and the LM head, once (for a
quantized layer its codes and scales). Achieved
bandwidth = weight MB / wall time, matmul bandwidth = weight MB / matmul time, both against this
machine's read bandwidth measured in the same run (a sum over a 512 MB buffer) and at the same torch
thread count. The gap between the wall time and the weight bytes at full bandwidth is what a faster
step could remove; the gap between matmul bandwidth and read bandwidth is the kernels' own.

Writes profile-step-<model>.{md,json} (or `--name`.{md,json}) into `--out`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from specserve.kernels.cpu_linear import HalfLinear, PackedLinear
from specserve.kernels.tree import chain_tree, stack_trees
from specserve.kernels.weight_only import WeightOnlyLinear
from specserve.server.engine.config import QUANTIZATIONS
from specserve.server.engine.loading import load_adapter
from specserve.server.engine.target import TargetModel

RESULTS = Path(__file__).parent / "results"
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
              "aten::fbgemm_linear_fp16_weight_fp32_activation"}
ATTENTION_OPS = {"specserve_cpu::attend"}  # kernels.cpu_attention's kernel (aten's SDPA ops say "attention")
PARTS = ["matmul", "attention", "other ops", "outside ops"]


def read_bandwidth_gbs(megabytes: int = 512, repeats: int = 10) -> float:
    """GB/s of summing a buffer far larger than any cache: the memory read rate one step can hope for."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    buffer.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        buffer.sum()
    return buffer.numel() * 4 * repeats / (time.perf_counter() - start) / 1e9


def weight_bytes(target: TargetModel) -> int:
    """Bytes of every linear weight of the decoder plus the LM head: what one step reads at least."""
    def size(layer) -> int:
        if isinstance(layer, WeightOnlyLinear):
            return layer.codes.nbytes + layer.scales.nbytes
        return layer.in_features * layer.out_features * target.dtype.itemsize

    kinds = (torch.nn.Linear, PackedLinear, HalfLinear, WeightOnlyLinear)
    return sum(size(m) for m in [*(m for m in target.adapter.decoder.modules() if isinstance(m, kinds)),
                                 target.lm_head])


def split(events, wall_ms: float, steps: int) -> dict[str, float]:
    """Per-step ms of each part from the profiler's per-op self times."""
    parts = dict.fromkeys(PARTS, 0.0)
    for event in events:
        if event.key in MATMUL_OPS:
            part = "matmul"
        elif "attention" in event.key or event.key in ATTENTION_OPS:
            part = "attention"
        else:
            part = "other ops"
        parts[part] += event.self_cpu_time_total / 1000 / steps
    parts["outside ops"] = max(wall_ms - parts["matmul"] - parts["attention"] - parts["other ops"], 0.0)
    return parts


@torch.inference_mode()
def verify_step(target: TargetModel, sizes: tuple[int, ...], prefix: int) -> Callable[[], None]:
    """One verify step of chains of `sizes` nodes (one per sequence), padded to the longest, after
    `prefix` cached tokens per sequence (prefilled here)."""
    batch, nodes = len(sizes), max(sizes)
    cache = target.new_cache(batch, prefix + nodes)
    generator = torch.Generator().manual_seed(0)
    vocab = target.embed_tokens.num_embeddings
    for slot in range(batch):
        ids = torch.randint(vocab, (1, prefix), generator=generator)
        target.prefill(target.embed_tokens(ids.to(target.device)), cache, slot, 0)
    tree = stack_trees([chain_tree(torch.randint(vocab, (1, n), generator=generator).to(target.device))
                        for n in sizes])
    slots, prefix_lens = list(range(batch)), [prefix] * batch

    @torch.inference_mode()
    def step() -> None:
        target.verify(tree, cache, slots, prefix_lens)

    return step


def profile_shape(targets: dict, sizes: tuple[int, ...], prefix: int, steps: int) -> dict:
    """Per configuration: the median wall time of a step, timed with the configurations' steps
    interleaved (a drift of the machine's speed hits all of them alike), and its split."""
    stepping = {config: verify_step(target, sizes, prefix) for config, target in targets.items()}
    walls = {config: [] for config in stepping}
    for _ in range(3):
        for step in stepping.values():
            step()
    for _ in range(steps):
        for config, step in stepping.items():
            start = time.perf_counter()
            step()
            walls[config].append((time.perf_counter() - start) * 1000)
    results = {}
    for config, step in stepping.items():
        wall_ms = statistics.median(walls[config])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        results[config] = {"wall_ms": wall_ms, **split(prof.key_averages(), wall_ms, steps)}
    return results


def report(args, bandwidth: float, runs: dict) -> str:
    lines = [
        f"# One verify step, profiled: {args.model}", "",
        f"Command: `python benchmarks/profile_step.py {' '.join(args.argv)}`  ",
        f"Chains of N nodes for B sequences (BxN; a+b+...: chains of a, b, ... nodes) after {args.prefix} "
        "cached tokens, the engine's verify call "
        f"(decoder + LM head), torch threads {args.threads}, median of {args.steps} steps interleaved across "
        "the configurations; the split comes "
        "from the torch profiler's per-op self times (definitions in the script's docstring). Read "
        f"bandwidth measured in the same run: {bandwidth:.1f} GB/s.", "",
        "| dtype | prepack | attention | quantization | BxN | wall ms | matmul ms | attention ms | other ops ms | "
        "outside ops ms | matmul share | weight MB | achieved GB/s | matmul GB/s | achieved / read bandwidth |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (dtype, prepack, attention, quantization), run in runs.items():
        mb = run["weight_mb"]
        for shape, r in run["shapes"].items():
            lines.append(
                f"| {dtype} | {prepack} | {attention} | {quantization} | {shape} | {r['wall_ms']:.1f} | "
                f"{r['matmul']:.1f} | {r['attention']:.1f} | {r['other ops']:.1f} | {r['outside ops']:.1f} | "
                f"{r['matmul'] / r['wall_ms']:.0%} | {mb:.0f} | "
                f"{mb / r['wall_ms']:.1f} | {mb / r['matmul']:.1f} | {mb / r['wall_ms'] / bandwidth:.0%} |")
    return "\n".join(lines) + "\n"


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """"BxN" (B chains of N nodes) or "a+b+..." (chains of a, b, ... nodes) -> (the text, the sizes)."""
    if "+" in text:
        return text, tuple(int(n) for n in text.split("+"))
    batch, nodes = text.lower().split("x")
    return text, (int(nodes),) * int(batch)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--prepack", nargs="+", choices=["off", "on"], default=["off", "on"],
                        help="linear weights as loaded, and/or packed as the engine packs them (kernels.cpu_linear)")
    parser.add_argument("--attention", nargs="+", choices=["sdpa", "grouped", "kernel"], default=["sdpa", "grouped"],
                        help="transformers' sdpa attention, the engine's grouped-query one on SDPA and/or on "
                             "its own CPU kernel")
    parser.add_argument("--quantization", nargs="+", choices=QUANTIZATIONS, default=["none"],
                        help="linear weights in the model's dtype and/or weight-only int8 / int4")
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[parse_shape(s) for s in ("1x1", "1x8", "8x1", "8x8")],
                        help="BxN: B sequences verifying N nodes each; a+b+...: chains of a, b, ... nodes")
    parser.add_argument("--prefix", type=int, default=256, help="cached tokens before each chain")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="results file stem (default: profile-step-<model>)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth_gbs()
    targets = {(dtype, prepack, attention, quantization):
               TargetModel(load_adapter(args.model, None, dtype, "cpu", prepack == "on", attention, quantization)[1])
               for dtype, prepack, attention, quantization
               in itertools.product(args.dtypes, args.prepack, args.attention, args.quantization)}
    runs = {config: {"weight_mb": weight_bytes(target) / 1e6, "shapes": {}} for config, target in targets.items()}
    for label, sizes in args.shapes:
        for config, result in profile_shape(targets, sizes, args.prefix, args.steps).items():
            runs[config]["shapes"][label] = result
    table = report(args, bandwidth, runs)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or f"profile-step-{Path(args.model).name}")
    stem.with_suffix(".md").write_text(table)
    named = {"/".join([dtype, f"prepack-{prepack}", attention, quantization]): run
             for (dtype, prepack, attention, quantization), run in runs.items()}
    stem.with_suffix(".json").write_text(json.dumps({"read_bandwidth_gbs": bandwidth, "runs": named}, indent=2))
    return runs


if __name__ == "__main__":
    main()
