"""Opt-in step profiling (`EngineConfig.profile`): each verify step's wall time splits into drafting,
verification and the rest, summed into the request's `SpecMetrics`; profiling never changes outputs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.metrics import SpecMetrics

PROMPTS = ["the quick brown fox", "a red circle, a blue square and a green triangle. a red circle, a blue"]
TIMES = ("draft_seconds", "verify_seconds", "step_seconds")


@pytest.mark.parametrize("draft", ["none", "ngram"])  # `none` is a one-node tree: plain AR steps, same split
def test_profiled_steps_split_into_draft_verify_and_other(tiny_model_dir, draft):
    plain = Engine.from_config(EngineConfig(model=str(tiny_model_dir), draft=draft, dtype="float64"))
    profiled = Engine(replace(plain.config, profile=True), plain.target, plain.tokenizer)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    for text in PROMPTS:
        prompt = plain.prepare_text(text)
        reference, out = plain.generate(prompt, params), profiled.generate(prompt, params)

        assert out.token_ids == reference.token_ids
        assert all(getattr(reference.metrics, name) == 0.0 for name in TIMES)
        assert reference.metrics.timing_dict() == {}
        m = out.metrics
        assert m.verify_steps > 0 and m.draft_seconds > 0 and m.verify_seconds > 0
        assert m.draft_seconds + m.verify_seconds <= m.step_seconds
        assert 0 <= m.timing_dict()["other_share"] < 1
        assert "step_seconds" not in m.to_dict()  # the API's spec_decode object keeps its schema


def test_merge_sums_times_and_timing_dict_is_per_verify_step():
    total = SpecMetrics(verify_steps=2, draft_seconds=0.002, verify_seconds=0.010, step_seconds=0.016)
    total.merge(SpecMetrics(verify_steps=2, draft_seconds=0.002, verify_seconds=0.006, step_seconds=0.008))

    assert (total.draft_seconds, total.verify_seconds, total.step_seconds) == pytest.approx((0.004, 0.016, 0.024))
    timing = total.timing_dict()
    assert timing == pytest.approx(
        {"draft_ms": 1.0, "verify_ms": 4.0, "other_ms": 1.0, "step_ms": 6.0, "other_share": 1 / 6}
    )
