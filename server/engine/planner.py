"""How many of its draft nodes each row of a batch sends to the verify forward.

A drafter proposes a tree as if its sequence ran alone. In a batch the verify forward carries every
row's tree, and once the forward is compute-bound each extra node delays every row. The planner cuts
each row's proposal to a prefix (parents precede children, so a prefix is a tree) so as to maximise
the batch's expected tokens per second:

    goodput = (B + sum_r gain_r(n_r)) / cost(B + sum_r (n_r - 1))

- B rows each emit at least one token (the bonus); n_r nodes of row r are verified, root included;
- `cost(T)`: measured seconds of a verify forward of T tokens (`StepCosts`, from
  `calibration.measure_step_costs` at load);
- `gain_r(n)`: the expected accepted draft tokens of row r's first n nodes. With `k_d` nodes at depth d
  and a per-token acceptance rate `a_r` (the row's own recent history, `AcceptanceRate`), depth d is
  reached with probability prod_{e <= d} (1 - (1 - a_r) ** k_e): a chain gives a_r ** d, extra
  siblings raise the odds at their depth.

Rows are extended greedily, best expected tokens per extra node first (each row's gain curve is
replaced by its upper concave hull so a low-value sibling cannot hide a valuable deeper node), and
the best prefix of that order wins. With costs flat in T (memory-bound) every row keeps its whole tree;
with a large batch on a compute-bound machine rows shrink, down to plain decoding when no draft pays.

A seeded sampling request is *pinned*: its tree is never cut, so its random draws, and hence its
output, do not depend on what else is in the batch.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

from ...kernels.tree import DraftTree


class BatchPlanner(Protocol):
    def plan(self, trees: list[DraftTree], rates: list[float], pinned: list[bool]) -> list[int]:
        """Nodes (root included) to verify of each row's tree (a batch of one each)."""
        ...


@dataclass
class AcceptanceRate:
    """A row's recent per-token draft acceptance rate: successes over trials with a prior, where a
    verify step that accepted `a` of `d` drafted levels counts a successes and one failure if a < d.
    Counts decay every step, so a row that stopped drafting drifts back to the prior and tries again."""

    prior: float = 0.5
    prior_weight: float = 2.0
    decay: float = 0.8
    successes: float = 0.0
    trials: float = 0.0

    @property
    def value(self) -> float:
        return (self.successes + self.prior * self.prior_weight) / (self.trials + self.prior_weight)

    def observe(self, drafted_depth: int, accepted: int) -> None:
        self.successes *= self.decay
        self.trials *= self.decay
        if drafted_depth > 0:
            self.successes += accepted
            self.trials += accepted + (1 if accepted < drafted_depth else 0)


@dataclass(frozen=True)
class StepCosts:
    """Seconds of one verify forward by total tokens, linear between measured sizes and past the last."""

    tokens: tuple[int, ...]  # ascending, at least two sizes
    seconds: tuple[float, ...]

    def __call__(self, total_tokens: int) -> float:
        i = min(max(bisect.bisect_left(self.tokens, total_tokens), 1), len(self.tokens) - 1)
        (t0, t1), (s0, s1) = self.tokens[i - 1 : i + 1], self.seconds[i - 1 : i + 1]
        return max(s0 + (s1 - s0) * (total_tokens - t0) / (t1 - t0), 1e-9)


def expected_gains(depths: list[int], rate: float) -> list[float]:
    """gain(n) for n = 1..len(depths): expected accepted drafts of the first n nodes (root at depth 0)."""
    per_depth: list[int] = []
    gains = [0.0]
    for depth in depths[1:]:
        if depth > len(per_depth):
            per_depth.append(0)
        per_depth[depth - 1] += 1
        reach, total = 1.0, 0.0
        for k in per_depth:
            reach *= 1.0 - (1.0 - rate) ** k
            total += reach
        gains.append(total)
    return gains


def hull_steps(gains: list[float]) -> list[tuple[float, int]]:
    """The upper concave hull of gain(n) from n = 1: (gain per extra node, nodes after the step) for
    each step, in order of decreasing gain per node."""
    steps: list[tuple[float, int]] = []
    at = 0
    while at < len(gains) - 1:
        best, end = max(((gains[j] - gains[at]) / (j - at), j) for j in range(at + 1, len(gains)))
        steps.append((best, end + 1))
        at = end
    return steps


@dataclass
class GoodputPlanner:
    """Cut rows to the prefixes that maximise expected tokens per second (module docstring)."""

    costs: StepCosts

    def plan(self, trees: list[DraftTree], rates: list[float], pinned: list[bool]) -> list[int]:
        depths = [tree.depths[0].tolist() for tree in trees]
        cut = [len(d) if pin else 1 for d, pin in zip(depths, pinned)]
        tokens = sum(cut)
        gain = len(trees) + sum(expected_gains(d, r)[-1] for d, r, pin in zip(depths, rates, pinned) if pin)
        steps = sorted(
            (-per_node, row, end)
            for row, (d, r, pin) in enumerate(zip(depths, rates, pinned)) if not pin
            for per_node, end in hull_steps(expected_gains(d, r))
        )
        best_goodput, best_cut = gain / self.costs(tokens), list(cut)
        for neg_per_node, row, end in steps:  # within a row the hull's steps come out in order
            tokens += end - cut[row]
            gain += -neg_per_node * (end - cut[row])
            cut[row] = end
            if gain / self.costs(tokens) > best_goodput:
                best_goodput, best_cut = gain / self.costs(tokens), list(cut)
        return best_cut


@dataclass(frozen=True)
class SharePlanner:
    """A fixed cap: the forward carries `tokens` tree tokens, each row an equal share (0 = no cap)."""

    tokens: int

    def plan(self, trees: list[DraftTree], rates: list[float], pinned: list[bool]) -> list[int]:
        share = max(1, self.tokens // len(trees)) if self.tokens else None
        return [tree.num_nodes if pin or share is None else min(share, tree.num_nodes)
                for tree, pin in zip(trees, pinned)]
