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
    hull_steps,
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


def test_the_hull_lets_a_deep_node_carry_a_low_value_sibling_before_it():
    gains = [0.0, 0.9, 0.9001, 1.7]  # node 2 is nearly worthless, node 3 (deeper) is not
    steps = hull_steps(gains)
    assert steps[0] == (pytest.approx(0.9), 2)
    assert steps[1][1] == 4 and steps[1][0] == pytest.approx(0.4)  # nodes 2 and 3 taken together
    assert [per_node for per_node, _ in steps] == sorted((p for p, _ in steps), reverse=True)


def test_free_tokens_keep_every_tree_whole_and_costly_tokens_with_poor_drafts_keep_none():
    trees = [chain(6), chain(9), chain(1)]
    assert GoodputPlanner(FLAT).plan(trees, [0.3, 0.3, 0.3], [False] * 3) == [6, 9, 1]
    assert GoodputPlanner(LINEAR).plan(trees, [0.3, 0.3, 0.3], [False] * 3) == [1, 1, 1]


def test_under_a_compute_bound_cost_the_better_drafter_gets_the_tokens():
    # past 4 tokens each token adds 5% of the forward: a near-sure draft pays, a 10% one does not
    costs = StepCosts((1, 4, 64), (1.0, 1.0, 4.0))
    sizes = GoodputPlanner(costs).plan([chain(5)] * 4, [0.99, 0.1, 0.1, 0.1], [False] * 4)
    assert sizes[0] > 1 and sizes[1:] == [1, 1, 1]


def test_a_pinned_row_is_never_cut():
    trees = [chain(8), chain(8)]
    assert GoodputPlanner(LINEAR).plan(trees, [0.1, 0.1], [True, False]) == [8, 1]
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
    for _ in range(40):
        rate.observe(drafted_depth=0, accepted=0)  # not drafted: no evidence, old evidence fades
    assert low < rate.value == pytest.approx(0.5, abs=0.05)
