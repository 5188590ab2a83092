"""`SpecMetrics`: per-step counting and merging, with the steps that verified no draft token."""

from __future__ import annotations

from specserve.server.engine.metrics import SpecMetrics


def test_drafted_steps_count_only_steps_that_verified_a_draft_token():
    first, second = SpecMetrics(), SpecMetrics()
    for proposed, accepted in [(5, 2), (0, 0), (3, 3)]:
        first.observe(proposed, accepted)
    second.observe(0, 0)
    second.observe(4, 1)
    first.merge(second)
    assert (first.verify_steps, first.drafted_steps) == (5, 3)
    assert first.mean_accepted_length == 1 + 6 / 5  # per verify step, drafted or not
    assert first.to_dict()["drafted_steps"] == 3
    assert first.per_position_acceptance == [3 / 5, 2 / 5, 1 / 5]
