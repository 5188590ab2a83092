"""The batch planner: which prefix of each row's draft tree a batch's verify forward carries."""

from __future__ import annotations

import pytest
import torch

from specserve.kernels.tree import DraftTree, chain_tree
from specserve.server.engine.planner import (
    AcceptanceRate,
    GoodputPlanner,
    SharePlanner,
    StepCosts,
    expected_gains,
)

FLAT = StepCosts((1, 256), (0.010, 0.010))  # memory-bound: every token is free
LINEAR = StepCosts((1, 256), (0.010, 2.560))  # compute-bound: every token costs as much as the first


def chain(n: int) -> DraftTree:
    return chain_tree(torch.arange(n)[None])


def test_step_costs_interpolate_between_sizes_and_extrapolate_past_the_last():
    costs = StepCosts((1, 2, 4), (1.0, 1.0, 3.0))
    assert costs(1) == 1.0 and costs(3) == pytest.approx(2.0) and costs(4) == 3.0
    assert costs(6) == pytest.approx(5.0)  # the last segment's slope goes on


def test_expected_gain_of_a_chain_is_the_geometric_sum_and_siblings_add_to_their_depth():
    assert expected_gains([0, 1, 2, 3], 0.5) == pytest.approx([0.0, 0.5, 0.75, 0.875])
    # root -> {a, b}: depth 1 is reached unless both siblings are rejected
    assert expected_gains([0, 1, 1], 0.5) == pytest.approx([0.0, 0.5, 0.75])


def test_the_width_is_what_pays_for_the_padded_batch():
    """Rows are padded to the widest: a short row's tree rides for free up to the chosen width, and
    one row's long tree is cut when widening every row would not pay."""
    costs = StepCosts((1, 4, 64), (1.0, 1.0, 1.6))  # past 4 tokens each token adds 1% of a forward
    trees = [chain(9), chain(3), chain(1), chain(1)]
    assert GoodputPlanner(costs).plan(trees, [0.9, 0.9, 0.9, 0.9], [False] * 4) == [9, 3, 1, 1]
    assert GoodputPlanner(costs).plan(trees, [0.3, 0.9, 0.9, 0.9], [False] * 4) == [3, 3, 1, 1]


def test_free_tokens_keep_every_tree_whole_and_costly_tokens_with_poor_drafts_keep_none():
    trees = [chain(6), chain(9), chain(1)]
    assert GoodputPlanner(FLAT).plan(trees, [0.3, 0.3, 0.3], [False] * 3) == [6, 9, 1]
    assert GoodputPlanner(LINEAR).plan(trees, [0.3, 0.3, 0.3], [False] * 3) == [1, 1, 1]


def test_a_pinned_row_is_never_cut():
    trees = [chain(8), chain(12)]
    # the batch is as wide as the pinned tree anyway: the other row's first 8 nodes ride along
    assert GoodputPlanner(LINEAR).plan(trees, [0.1, 0.1], [True, False]) == [8, 8]
    assert SharePlanner(4).plan(trees, [0.1, 0.1], [True, False]) == [8, 2]


def test_a_fixed_share_splits_the_tokens_equally_and_zero_means_no_cap():
    trees = [chain(8), chain(3), chain(8), chain(8)]
    assert SharePlanner(8).plan(trees, [0.5] * 4, [False] * 4) == [2, 2, 2, 2]
    assert SharePlanner(0).plan(trees, [0.5] * 4, [False] * 4) == [8, 3, 8, 8]
    assert SharePlanner(2).plan(trees, [0.5] * 4, [False] * 4) == [1, 1, 1, 1]  # plain decoding


def test_the_acceptance_rate_follows_a_rows_history_and_drifts_back_to_the_prior_when_idle():
    rate = AcceptanceRate()
    assert rate.value == 0.5
    for _ in range(10):
        rate.observe(drafted_depth=4, accepted=4)  # everything accepted
    high = rate.value
    assert high > 0.9
    for _ in range(15):
        rate.observe(drafted_depth=4, accepted=0)  # a rejection at the first level: one failed trial
    assert rate.value < 0.3
    low = rate.value
    for _ in range(5):
        rate.observe(drafted_depth=0, accepted=0)  # not drafted: no evidence, old evidence fades slowly
    assert low < rate.value < 0.3
    for _ in range(100):
        rate.observe(drafted_depth=0, accepted=0)
    assert rate.value == pytest.approx(0.5, abs=0.05)


def test_drafting_is_tried_first_then_skipped_while_its_own_cost_cannot_pay():
    planner = GoodputPlanner(FLAT)  # a forward costs 10 ms whatever it carries
    rates, free = [0.3, 0.3], [False, False]
    assert planner.drafting(rates, free) == [True, True]  # nothing measured yet: draft and measure
    planner.plan([chain(6), chain(6)], rates, free)
    planner.observe_drafting(2, 0.0001)  # nearly free drafting pays even at a poor acceptance rate
    assert planner.drafting(rates, free) == [True, True]
    planner.observe_drafting(2, 0.100)  # drafting that costs several forwards does not
    planner.observe_drafting(2, 0.100)
    assert planner.drafting(rates, free) == [False, False]
    assert planner.drafting(rates, [True, False]) == [True, False]  # a pinned row drafts anyway


def test_a_skipped_drafter_is_tried_again_once_its_cost_estimate_has_decayed():
    planner = GoodputPlanner(FLAT)
    planner.plan([chain(6)], [0.3], [False])
    planner.observe_drafting(1, 0.05)
    decisions = [planner.drafting([0.3], [False])[0] for _ in range(60)]
    # (1 + 0.43) / (0.010 + D) >= 1 / 0.010 once D <= 4.3 ms: 0.05 * 0.9^k falls below it at k = 24
    assert decisions.index(True) == 24 and not any(decisions[:24])


def test_a_fixed_share_always_drafts():
    assert SharePlanner(4).drafting([0.0, 0.0], [False, False]) == [True, True]


def test_measured_turns_overrule_the_model_once_both_kinds_are_known():
    """The model says a poor acceptance rate cannot pay for costly drafting; turns that drafted
    nonetheless yielded more than plain ones, so the measurement decides: draft."""
    planner = GoodputPlanner(FLAT)
    rates, free = [0.1, 0.1], [False, False]
    planner.plan([chain(6), chain(6)], rates, free)
    planner.observe_drafting(2, 0.100)
    planner.observe_turn(2, True, 8, 0.110)  # 73 tokens/s drafting
    assert planner.drafting(rates, free) == [False, False]  # plain yield unknown: one plain turn measures it
    planner.observe_turn(2, False, 2, 0.010)  # 200 tokens/s plain
    assert planner.drafting(rates, free) == [False, False]  # 73 < 200: plain (drafting now 1 turn stale)
    planner.observe_turn(2, True, 40, 0.110)  # 364 tokens/s: drafting's estimate 73 + 0.3 (364 - 73) = 160
    decisions = [planner.drafting(rates, free)[0] for _ in range(10)]
    # drafting's 160 is credited 3% per turn since it was measured: 160 * 1.03^8 = 203 >= 200 (1.03^7: 197)
    assert decisions.index(True) == 8 and not any(decisions[:8])


def test_measured_turns_keep_a_paying_drafter_drafting_and_remeasure_plain_now_and_then():
    planner = GoodputPlanner(FLAT)
    rates, free = [0.1], [False]
    planner.plan([chain(6)], rates, free)
    planner.observe_drafting(1, 0.100)
    planner.observe_turn(1, False, 1, 0.010)  # 100 tokens/s plain
    planner.observe_turn(1, True, 14, 0.110)  # 127 tokens/s drafting, against the model's verdict
    decisions = [planner.drafting(rates, free)[0] for _ in range(30)]
    # plain's 100 is credited 1% per turn since it was measured: 100 * 1.01^25 = 128.2 > 127.3 (1.01^24: 127.0)
    assert decisions.index(False) == 25 and all(decisions[:25])


def test_a_drafter_measured_poorly_once_is_tried_again_while_plain_turns_keep_being_measured():
    """Every plain turn measures plain again; drafting, not run, grows stale and is credited for it."""
    planner = GoodputPlanner(FLAT)
    rates, free = [0.3], [False]
    planner.plan([chain(6)], rates, free)
    planner.observe_drafting(1, 0.01)
    planner.observe_turn(1, True, 8, 0.100)  # 80 tokens/s drafting
    planner.observe_turn(1, False, 1, 0.010)  # 100 tokens/s plain
    decisions = []
    for _ in range(12):
        decisions.append(planner.drafting(rates, free)[0])
        if decisions[-1]:
            break
        planner.observe_turn(1, False, 1, 0.010)  # the plain turn just run: 100 tokens/s again
    # 80 * 1.03^8 = 101 >= 100 (1.03^7: 98)
    assert decisions == [False] * 8 + [True]


def test_a_size_whose_drafting_is_measured_gets_one_plain_turn_to_measure_plain():
    """Cheap drafting that the model favours: without a plain turn of this size, the measurement would
    never get to decide."""
    planner = GoodputPlanner(FLAT)
    rates, free = [0.9, 0.9], [False, False]
    planner.plan([chain(6), chain(6)], rates, free)
    planner.observe_drafting(2, 0.0001)
    assert planner.drafting(rates, free) == [True, True]  # nothing measured: the model says draft
    planner.observe_turn(2, True, 4, 0.040)  # 100 tokens/s drafting
    assert planner.drafting(rates, free) == [False, False]  # the plain yield of 2 rows is unknown
    planner.observe_turn(2, False, 2, 0.010)  # 200 tokens/s plain
    assert planner.drafting(rates, free) == [False, False]  # the measurement decides against the model
    assert planner.drafting([0.9], [False]) == [True]  # another size: nothing measured, the model decides


def test_a_packed_batch_does_not_pay_for_padding():
    """Packed, a row costs only the nodes it keeps: the long tree pays for its width, the roots alone
    ride along for free; padded, every row would cost that width and the long tree is cut."""
    costs = StepCosts((1, 64), (1.0, 1.0 + 63 * 0.05))  # every token adds 5% of a forward
    trees = [chain(6)] + [chain(1)] * 7
    rates = [0.95] * 8
    assert GoodputPlanner(costs, packed=True).plan(trees, rates, [False] * 8) == [6] + [1] * 7
    assert GoodputPlanner(costs).plan(trees, rates, [False] * 8) == [1] * 8
