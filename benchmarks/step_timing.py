"""Step-time split and speedup bounds, shared by the benchmark reports.

The engines run with `EngineConfig(profile=True)`, so every verify step's wall time splits into
drafting (the drafter's propose + commit), verification (the target's tree forward) and other
(acceptance, KV compaction, host sync, emit, Python bookkeeping). With tau the mean accepted length
(bonus included) and t_ar the step time of plain decoding (the same engine with drafter `none`, one
token per step):

- ideal speedup = tau * t_ar / (t_draft + t_verify): the decode steps with no overhead at all;
- step-achieved speedup = tau * t_ar / t_step: the decode steps as they ran.

The measured end-to-end speedup is lower again: it also pays prefill and per-request costs.
"""

from __future__ import annotations

from specserve.server.engine.metrics import SpecMetrics

COLUMNS = ["ideal speedup", "step speedup", "draft ms/step", "verify ms/step", "other ms/step", "other share"]
NOTE = (
    "Per verify step (engine profiling): draft = the drafter's propose + catch-up, verify = the target's "
    "tree forward, other = the rest of the step (acceptance, KV compaction, host sync, emit, Python); "
    "ideal speedup = tau * t_ar / (t_draft + t_verify), step speedup = tau * t_ar / t_step, with tau the "
    "mean accepted length and t_ar the step time of plain decoding (specserve with drafter `none`)."
)


def step_report(metrics: SpecMetrics, ar: SpecMetrics | None) -> dict:
    """`metrics.timing_dict()` plus the two speedup bounds against `ar`'s step time (None without
    `ar`); {} if the steps were not profiled."""
    timing = metrics.timing_dict()
    if not timing:
        return {}
    ideal = achieved = None
    ar_step_ms = ar.timing_dict().get("step_ms") if ar is not None else None
    if ar_step_ms:
        ar_ms = metrics.mean_accepted_length * ar_step_ms  # what AR takes for the tokens of one step
        ideal = ar_ms / (timing["draft_ms"] + timing["verify_ms"])
        achieved = ar_ms / timing["step_ms"]
    return {**timing, "ideal_speedup": ideal, "step_speedup": achieved}


def cells(report: dict) -> list[str]:
    """The markdown cells under `COLUMNS` for a `step_report`; '-' for what was not measured."""
    def fmt(key: str, spec: str, suffix: str = "") -> str:
        value = report.get(key)
        return "-" if value is None else format(value, spec) + suffix

    return [fmt("ideal_speedup", ".2f", "x"), fmt("step_speedup", ".2f", "x"), fmt("draft_ms", ".2f"),
            fmt("verify_ms", ".2f"), fmt("other_ms", ".2f"), fmt("other_share", ".1%")]
