"""Measured verify cost: the tree's node budget (as MSD picks it) and the batch planner's cost curve.

A verify forward of N tree nodes costs about the same as one token while the hardware is memory
bound, then grows with N once it is compute bound; where that happens depends on the machine, the
model and the dtype. `calibrate_tree_nodes` times verify forwards of each candidate size on a
synthetic prefix and keeps the largest size whose cost stays within `max_cost_ratio` of verifying a
single token. `measure_step_costs` times forwards of 1, 2, 4, ... tokens up to the largest batch of
trees, the curve `planner.GoodputPlanner` weighs each extra draft node against.
"""

from __future__ import annotations

import logging
import time

import torch

from ...kernels.tree import chain_tree
from .outputs import PromptInput
from .planner import StepCosts
from .target import TargetModel

log = logging.getLogger(__name__)

CANDIDATES = (2, 4, 8, 16, 24, 32, 48, 64)


def verify_seconds(target: TargetModel, sizes: list[int], prefix_len: int, repeats: int) -> list[float]:
    """Fastest wall time of verifying a chain of each of `sizes` nodes after a `prefix_len`-token
    prefix (the minimum is the least disturbed by other work on the machine). The prefix is prefilled
    once; every verify overwrites the rows after it."""
    vocab = target.config.vocab_size
    prefix = torch.randint(0, vocab, (prefix_len,)).tolist()
    cache = target.new_cache(1, prefix_len + max(sizes))
    target.prefill(target.embed(PromptInput(prefix)).embeds, cache, 0, 0)
    fastest = []
    for nodes in sizes:
        tree = chain_tree(torch.randint(0, vocab, (1, nodes), device=target.device))
        times = []
        for _ in range(repeats + 1):  # the first run warms up kernels and allocations
            start = time.perf_counter()
            target.verify(tree, cache, [0], [prefix_len])
            if target.device.type == "cuda":
                torch.cuda.synchronize(target.device)
            times.append(time.perf_counter() - start)
        fastest.append(min(times[1:]))
    return fastest


def calibrate_tree_nodes(
    target: TargetModel, max_cost_ratio: float = 1.3, prefix_len: int = 256, repeats: int = 5
) -> tuple[int, dict[int, float]]:
    """The chosen draft-node budget (root excluded) and the measured cost ratio of every size."""
    base, *seconds = verify_seconds(target, [1, *(size + 1 for size in CANDIDATES)], prefix_len, repeats)
    ratios = {size: s / base for size, s in zip(CANDIDATES, seconds)}
    fitting = [size for size, ratio in ratios.items() if ratio <= max_cost_ratio]
    chosen = max(fitting, default=CANDIDATES[0])
    log.info("tree budget calibration (verify cost / one token): %s -> %d nodes",
             {k: round(v, 2) for k, v in ratios.items()}, chosen)
    return chosen, ratios


def measure_step_costs(target: TargetModel, max_tokens: int, prefix_len: int = 128, repeats: int = 3) -> StepCosts:
    """Verify-forward seconds at 1, 2, 4, ... tokens and at `max_tokens` (the largest batch of trees),
    made non-decreasing (more tokens never cost less; a dip is noise of the measurement)."""
    sizes = sorted({*(2**i for i in range(max(max_tokens, 2).bit_length()) if 2**i < max_tokens), max(max_tokens, 2)})
    measured = verify_seconds(target, sizes, prefix_len, repeats)
    seconds = tuple(max(measured[: i + 1]) for i in range(len(measured)))
    log.info("verify forward cost by tokens (ms): %s", {t: round(s * 1000, 1) for t, s in zip(sizes, seconds)})
    return StepCosts(tuple(sizes), seconds)
