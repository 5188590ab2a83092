"""Pick the tree's node budget from measured verify cost (as MSD does), instead of a GPU default.

A verify forward of N tree nodes costs about the same as one token while the hardware is memory
bound, then grows with N once it is compute bound; where that happens depends on the machine, the
model and the dtype. `calibrate_tree_nodes` times verify forwards of each candidate size on a
synthetic prefix and keeps the largest size whose cost stays within `max_cost_ratio` of verifying a
single token.
"""

from __future__ import annotations

import logging
import time

import torch

from ...kernels.tree import chain_tree
from .outputs import PromptInput
from .target import TargetModel

log = logging.getLogger(__name__)

CANDIDATES = (2, 4, 8, 16, 24, 32, 48, 64)


def verify_seconds(target: TargetModel, nodes: int, prefix_len: int, repeats: int) -> float:
    """Fastest wall time of verifying `nodes` tree nodes after a `prefix_len`-token prefix (the minimum
    is the least disturbed by other work on the machine)."""
    vocab = target.config.vocab_size
    prefix = torch.randint(0, vocab, (prefix_len,)).tolist()
    cache = target.new_cache(1, prefix_len + nodes)
    target.prefill(PromptInput(prefix), cache, 0)
    tree = chain_tree(torch.randint(0, vocab, (1, nodes), device=target.device))
    times = []
    for _ in range(repeats + 1):  # the first run warms up kernels and allocations
        start = time.perf_counter()
        target.verify(tree, cache, [0], [prefix_len])  # overwrites the same rows each time
        if target.device.type == "cuda":
            torch.cuda.synchronize(target.device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def calibrate_tree_nodes(
    target: TargetModel, max_cost_ratio: float = 1.3, prefix_len: int = 256, repeats: int = 5
) -> tuple[int, dict[int, float]]:
    """The chosen draft-node budget (root excluded) and the measured cost ratio of every size."""
    base = verify_seconds(target, 1, prefix_len, repeats)
    ratios: dict[int, float] = {}
    for size in CANDIDATES:
        ratios[size] = verify_seconds(target, size + 1, prefix_len, repeats) / base
    fitting = [size for size, ratio in ratios.items() if ratio <= max_cost_ratio]
    chosen = max(fitting, default=CANDIDATES[0])
    log.info("tree budget calibration (verify cost / one token): %s -> %d nodes",
             {k: round(v, 2) for k, v in ratios.items()}, chosen)
    return chosen, ratios
