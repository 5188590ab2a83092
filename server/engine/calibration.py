"""Measured verify cost: the tree's node budget (as MSD picks it) and the batch planner's cost curve.

A verify forward of N tree nodes costs about the same as one token while the hardware is memory
bound, then grows with N once it is compute bound; where that happens depends on the machine, the
model and the dtype. `calibrate_tree_nodes` times verify forwards of each candidate size on a
synthetic prefix and keeps the largest size whose cost stays within `max_cost_ratio` of verifying a
single token. `measure_step_costs` times forwards of 1, 2, 4, ... tokens up to the largest batch of
trees, the curve `planner.GoodputPlanner` weighs each extra draft node against.

Self-drafting (`--draft self:auto`) trades a cheaper draft (fewer layers) against more rejected
nodes; which wins depends on the model and the machine, so `calibrate_self_layers` decodes greedily
through the engine's own step with each of a few early-exit depths and keeps the fastest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ...drafting.base import Proposer
from ...drafting.budget import TreeBudget
from ...drafting.self_draft import self_draft_proposer
from ...drafting.shaper import draft_rows, largest_tree
from ...kernels.tree import chain_tree
from .config import SamplingParams
from .outputs import PromptInput
from .planner import SharePlanner, StepCosts
from .profiling import Stopwatch
from .sequence import Sequence
from .step import prefill, speculative_step
from .target import TargetModel

log = logging.getLogger(__name__)

CANDIDATES = (2, 4, 8, 16, 24, 32, 48, 64)
# early-exit depths tried by `self:auto`, as shares of the decoder's layers: few, so that loading stays
# quick (LayerSkip and Draft&Verify find their best exits between a quarter and a half of the layers)
SELF_LAYER_SHARES = (1 / 8, 1 / 4, 1 / 2, 3 / 4)


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


def self_layer_candidates(num_layers: int) -> list[int]:
    """The early-exit depths `self:auto` measures: 30 layers -> [4, 8, 15, 22], 2 -> [1]. Never
    every layer (a draft as slow as the target) unless the model has only one."""
    top = max(1, num_layers - 1)
    return sorted({min(top, max(1, round(share * num_layers))) for share in SELF_LAYER_SHARES})


def choose_self_layers(
    candidates: list[int], tokens_per_second: Callable[[int], float]
) -> tuple[int, dict[int, float]]:
    """The candidate whose measured speed is highest (on a tie the fewer layers: a smaller draft KV
    cache), and every candidate's speed."""
    speeds = {layers: tokens_per_second(layers) for layers in candidates}
    return max(candidates, key=lambda layers: (speeds[layers], -layers)), speeds


def calibrate_self_layers(target: TargetModel, tree: TreeBudget, max_tokens: int = 16, repeats: int = 2) -> int:
    """The number of early layers that self-drafts fastest: greedy tokens/s of `max_tokens` tokens
    (the best of `repeats` runs, the least disturbed by other work) for each candidate depth.

    The prompt is the model's own start token, so the measured text is what the model itself writes;
    no tokenizer is needed (the proposer is built before one is at hand)."""
    bos = target.config.bos_token_id
    prompt = [bos if isinstance(bos, int) else 0]

    def speed(layers: int) -> float:
        proposer = self_draft_proposer(target.model, layers, tree)
        return max(greedy_tokens_per_second(target, proposer, tree, prompt, max_tokens) for _ in range(repeats))

    candidates = self_layer_candidates(target.config.num_hidden_layers)
    # warm-up: the first run pays for allocations and kernel selection
    greedy_tokens_per_second(target, self_draft_proposer(target.model, candidates[0], tree), tree, prompt, 8)
    chosen, speeds = choose_self_layers(candidates, speed)
    log.info("self-draft calibration (greedy tokens/s by early layers): %s -> %d of %d layers",
             {k: round(v, 1) for k, v in speeds.items()}, chosen, target.config.num_hidden_layers)
    return chosen


class _NoText:
    """The detokenizer of a calibration sequence: it counts tokens and never needs their text."""

    def add(self, token_id: int) -> str:
        return ""


@torch.inference_mode()
def greedy_tokens_per_second(target: TargetModel, proposer: Proposer, tree: TreeBudget, prompt: list[int],
                             max_tokens: int) -> float:
    """Tokens/s of decoding `max_tokens` tokens greedily after `prompt` with `proposer`, through the
    engine's prefill and speculative step (one sequence in its own small caches, every draft node
    verified), prefill included."""
    cache = target.new_cache(1, len(prompt) + max_tokens + largest_tree(tree))
    proposer.reserve(1, len(prompt) + max_tokens + draft_rows(tree))
    seq = Sequence(PromptInput(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), _NoText(),
                   frozenset(), slot=0)
    stopwatch, planner = Stopwatch(False, target.device), SharePlanner(0)
    start = time.perf_counter()
    prefill(seq, target, proposer, cache, len(prompt))
    while not seq.finished:
        (out,) = speculative_step([seq], target, proposer, cache, stopwatch, planner)
        if isinstance(out, Exception):  # the step hands back a sequence's own failure instead of raising
            raise out
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    seconds = time.perf_counter() - start
    seq.draft.close()
    return len(seq.output_ids) / seconds
