"""The speedup bounds of the benchmark tables (`benchmarks/step_timing.py`) on literal metrics."""

from __future__ import annotations

import pytest

from specserve.server.engine.metrics import SpecMetrics


def test_bounds_against_plain_decoding_steps(benchmark_script):
    step_timing = benchmark_script("step_timing")
    ar = SpecMetrics(verify_steps=10, draft_seconds=0.001, verify_seconds=0.080, step_seconds=0.100)  # 10 ms/step
    # 4 steps of 3 tokens each (tau 3): 2 ms drafting + 12 ms verification + 1 ms other per step
    spec = SpecMetrics(verify_steps=4, accepted_draft_tokens=8, draft_seconds=0.008, verify_seconds=0.048,
                       step_seconds=0.060)

    report = step_timing.step_report(spec, ar)
    assert report["ideal_speedup"] == pytest.approx(3 * 10 / 14)
    assert report["step_speedup"] == pytest.approx(3 * 10 / 15)
    assert step_timing.cells(report) == ["2.14x", "2.00x", "2.00", "12.00", "1.00", "6.7%"]
    # Without plain decoding to compare with, the split stays and the bounds are '-'.
    assert step_timing.cells(step_timing.step_report(spec, None))[:3] == ["-", "-", "2.00"]
    assert step_timing.step_report(SpecMetrics(verify_steps=4), ar) == {}  # not profiled
