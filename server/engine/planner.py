"""How many of its draft nodes each row of a batch sends to the verify forward.

A drafter proposes a tree as if its sequence ran alone. In a batch the verify forward carries every
row's tree padded to the widest (`stack_trees`), so it runs B x w tokens for B rows of width w, and
once the forward is compute-bound each extra node delays every row. The planner picks the width, and
cuts each row's proposal to its first w nodes (parents precede children, so a prefix is a tree), so
as to maximise the batch's expected tokens per second:

    goodput(w) = (B + sum_r gain_r(min(w, N_r))) / cost(B * w)

- B rows each emit at least one token (the bonus); N_r is the size of row r's proposal;
- `cost(T)`: measured seconds of a verify forward of T tokens (`StepCosts`, from
  `calibration.measure_step_costs` at load);
- `gain_r(n)`: the expected accepted draft tokens of row r's first n nodes. With `k_d` nodes at depth d
  and a per-token acceptance rate `a_r` (the row's own recent history, `AcceptanceRate`), depth d is
  reached with probability prod_{e <= d} (1 - (1 - a_r) ** k_e): a chain gives a_r ** d, extra
  siblings raise the odds at their depth.

With costs flat in T (memory-bound) every row keeps its whole tree; with a large batch on a
compute-bound machine the width shrinks, down to 1 (plain decoding) when no draft pays.

Where the target runs a batch *packed* (`TargetModel.packs`: no padding nodes in the forward, once
padding is a third of the batch, or as soon as there is any where attention takes the packed batch in
one call, `kernels.tree.worth_packing`), a row costs only the nodes it keeps,
so the cost is cost(sum_r min(w, N_r)) instead of cost(B * w): a row whose tree is short (or only a
root) no longer pays for the widest one. (Cutting each row on its own,
greedily by expected gain, was tried: in an interleaved engine A/B on SmolLM2 n-gram it sent more
nodes than paid at 2-4 rows, where the per-token acceptance rate overrates n-gram drafts, and was
slower over whole batches than one width; so one width for all is kept.)

A seeded sampling request is *pinned*: its tree is never cut, so its random draws, and hence its
output, do not depend on what else is in the batch; the width is then at least its tree's size.

Drafting itself costs time that is spent before the cut (a head or a draft LM runs a forward per tree
level). So before drafting, `drafting` asks whether it can pay this turn: with D(n) the measured
seconds of drafting for n rows (`observe_drafting`) and each row's expected gain on the shape of the
last tree drafted,

    draft iff  max_w (B + sum_r gain_r(w)) / (cost(B * w) + D(B))  >=  B / cost(B)

and otherwise only the pinned rows draft (the others send their root alone, and their drafters just
keep up with the text). Nothing is known before the first drafting turn, so it drafts. While drafting
is skipped, D decays (and the rows' acceptance rates drift back to their prior), so a measurement
taken in a slow moment does not stop drafting for good: once the decayed estimate says drafting may
pay, it drafts once more and measures again.

That rule is a model, and under load its inputs drift from the truth: a batch of B rows costs more
than a calibration forward of as many tokens (B caches to read, a busy machine), and a per-token
acceptance rate underrates drafts that are either copied whole or not at all (n-gram). So the
planner also keeps what whole turns actually yielded, tokens emitted per second of drafting +
verify, for drafting and for plain turns of each batch size (`observe_turn`). Once both are known
for a size, they decide instead of the model. A size whose drafting turns are measured but whose
plain yield is not gets one plain turn to measure it (the model alone would keep drafting at every
size it favours, and never learn that it should not). The kind not chosen is not measured, so its
estimate grows stale; it is credited `stale_drafting_gain` (drafting) or `stale_plain_gain` (plain)
per turn since it was last measured, so it is tried again, sooner the closer the two were: drafting
after a few turns (the rows' text changes what it yields), plain rarely (its yield changes with the
batch's cost, not with its text). (Shrinking the chosen kind's estimate instead does not work: each
of its turns measures it again, and the two settle a few percent under its true yield.)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

from ...kernels.tree import DraftTree, worth_packing


class BatchPlanner(Protocol):
    def drafting(self, rates: list[float], pinned: list[bool]) -> list[bool]:
        """Before drafting: which rows draft a tree this turn (the others propose their root alone)."""
        ...

    def observe_drafting(self, rows: int, seconds: float) -> None:
        """Drafting for `rows` rows took `seconds`."""
        ...

    def observe_turn(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        """A turn of `rows` rows, with drafting or without, emitted `tokens` in `seconds` (drafting,
        verify and emit)."""
        ...

    def plan(self, trees: list[DraftTree], rates: list[float], pinned: list[bool]) -> list[int]:
        """Nodes (root included) to verify of each row's tree (a batch of one each)."""
        ...


@dataclass
class AcceptanceRate:
    """A row's recent per-token draft acceptance rate: successes over trials with a prior, where a
    verify step that accepted `a` of `d` drafted levels counts a successes and one failure if a < d.
    Counts decay with every drafted step (recent text matters most), and more slowly with every step
    that verified no draft, so a row that stopped drafting drifts back to the prior and, some 30
    steps later, tries again (a faster drift would spend a verify of several tokens on a row that
    just showed its drafts fail)."""

    prior: float = 0.5
    prior_weight: float = 2.0
    decay: float = 0.8
    idle_decay: float = 0.95
    successes: float = 0.0
    trials: float = 0.0

    @property
    def value(self) -> float:
        return (self.successes + self.prior * self.prior_weight) / (self.trials + self.prior_weight)

    def observe(self, drafted_depth: int, accepted: int) -> None:
        decay = self.decay if drafted_depth > 0 else self.idle_decay
        self.successes *= decay
        self.trials *= decay
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


@dataclass
class GoodputPlanner:
    """The width that maximises expected tokens per second, and whether drafting pays (module
    docstring)."""

    costs: StepCosts
    packed: bool = False  # the verify forward carries no padding nodes: a row costs the nodes it keeps
    one_call: int = 0  # trees up to this many nodes attend packed in one call (`TargetModel.one_call_nodes`)
    smoothing: float = 0.5  # weight of a new drafting-time measurement
    forgetting: float = 0.9  # drafting-time estimates shrink by this per skipped turn
    turn_smoothing: float = 0.3  # weight of a new turn's tokens per second
    stale_drafting_gain: float = 1.03  # credit per turn since drafting turns were last measured
    stale_plain_gain: float = 1.01  # credit per turn since plain turns were last measured
    draft_seconds: dict[int, float] = field(default_factory=dict)  # rows -> measured drafting seconds
    yields: dict[tuple[int, bool], float] = field(default_factory=dict)  # (rows, drafted) -> tokens/s
    stale: dict[tuple[int, bool], int] = field(default_factory=dict)  # (rows, drafted) -> turns since measured
    shape: list[int] | None = None  # node depths of the widest tree last drafted

    def drafting(self, rates: list[float], pinned: list[bool]) -> list[bool]:
        rows = len(rates)
        if self.shape is None or rows not in self.draft_seconds:
            return [True] * rows  # nothing measured yet: draft, and measure
        drafted, plain = self.yields.get((rows, True)), self.yields.get((rows, False))
        if drafted is not None and plain is not None:  # what turns of this size yielded, stale ones credited
            pays = (drafted * self.stale_drafting_gain ** self.stale.get((rows, True), 0)
                    >= plain * self.stale_plain_gain ** self.stale.get((rows, False), 0))
            # the kind not run this turn grows staler (counted only here, so a count stays below what
            # the ratio of two finite yields needs: the credit cannot overflow)
            self.stale[rows, not pays] = self.stale.get((rows, not pays), 0) + 1
        elif drafted is not None:
            pays = False  # one plain turn, to measure it
        else:
            gains = [expected_gains(self.shape, rate) for rate in rates]
            widths = range(1, len(self.shape) + 1)
            pays = max(self._goodput(gains, w, self.draft_seconds[rows]) for w in widths) >= rows / self.costs(rows)
        if pays:
            return [True] * rows
        for n in self.draft_seconds:
            self.draft_seconds[n] *= self.forgetting
        return list(pinned)

    def observe_drafting(self, rows: int, seconds: float) -> None:
        known = self.draft_seconds.get(rows)
        self.draft_seconds[rows] = seconds if known is None else known + self.smoothing * (seconds - known)

    def observe_turn(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        rate, known = tokens / max(seconds, 1e-9), self.yields.get((rows, drafted))
        self.yields[rows, drafted] = rate if known is None else known + self.turn_smoothing * (rate - known)
        self.stale[rows, drafted] = 0

    def plan(self, trees: list[DraftTree], rates: list[float], pinned: list[bool]) -> list[int]:
        sizes = [tree.num_nodes for tree in trees]
        gains = [expected_gains(tree.depths[0].tolist(), rate) for tree, rate in zip(trees, rates)]
        if max(sizes) > 1:
            self.shape = trees[sizes.index(max(sizes))].depths[0].tolist()
        narrowest = max((n for n, pin in zip(sizes, pinned) if pin), default=1)
        # the first (narrowest) of equals
        width = max(range(narrowest, max(sizes) + 1), key=lambda w: self._goodput(gains, w, 0.0))
        return [n if pin else min(n, width) for n, pin in zip(sizes, pinned)]

    def _goodput(self, gains: list[list[float]], width: int, draft_seconds: float) -> float:
        """Expected tokens per second of a turn whose rows verify their first `width` nodes."""
        gain = sum(g[min(width, len(g)) - 1] for g in gains)
        real, padded = sum(min(width, len(g)) for g in gains), len(gains) * width
        tokens = real if self.packed and worth_packing(real, padded, width <= self.one_call) else padded
        return (len(gains) + gain) / (self.costs(tokens) + draft_seconds)


@dataclass(frozen=True)
class SharePlanner:
    """A fixed cap: the forward carries `tokens` tree tokens, each row an equal share (0 = no cap)."""

    tokens: int

    def drafting(self, rates: list[float], pinned: list[bool]) -> list[bool]:
        return [True] * len(rates)

    def observe_drafting(self, rows: int, seconds: float) -> None:
        pass

    def observe_turn(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        pass

    def plan(self, trees: list[DraftTree], rates: list[float], pinned: list[bool]) -> list[int]:
        share = max(1, self.tokens // len(trees)) if self.tokens else None
        return [tree.num_nodes if pin or share is None else min(share, tree.num_nodes)
                for tree, pin in zip(trees, pinned)]
