"""The batched-steps benchmark (`benchmarks/batch_steps.py`) on the tiny llama: counts, not timings."""

from __future__ import annotations

import json


def test_a_run_reports_every_batch_and_the_planners_costs(benchmark_script, tiny_model_dirs, tmp_path):
    bench = benchmark_script("batch_steps")
    model = tiny_model_dirs["llama"]
    runs = bench.main(["--model", str(model), "--drafts", "none", "ngram", "--batches", "1", "3",
                       "--max-tokens", "8", "--prepack", "off", "on", "--out", str(tmp_path), "--name", "steps"])
    assert set(runs) == {("float32", prepack, draft) for prepack in ("off", "on") for draft in ("none", "ngram")}
    for (_, _, draft), run in runs.items():
        assert set(run["batches"]) == {"1", "3"}
        for r in run["batches"].values():
            assert r["tokens_per_s"] > 0 and r["tokens_per_row_turn"] >= 1.0
        assert (run["costs_ms"] != {}) == (draft == "ngram")  # no planner to measure for without a drafter
    assert all(r["drafted_per_row_turn"] == 0 for r in runs["float32", "on", "none"]["batches"].values())
    assert all(0 < r["draft_ms_per_turn"] < r["ms_per_turn"]
               for r in runs["float32", "on", "ngram"]["batches"].values())
    table = (tmp_path / "steps.md").read_text()
    assert "| float32 | off | ngram | 3 |" in table and "| float32 | on | ngram | 3 |" in table
    assert json.loads((tmp_path / "steps.json").read_text()).keys() == {
        "float32/prepack-off/none", "float32/prepack-off/ngram", "float32/prepack-on/none", "float32/prepack-on/ngram"}


def test_a_closed_loop_replaces_each_finished_request_and_reports_its_tail(benchmark_script, tiny_model_dirs, tmp_path):
    bench = benchmark_script("batch_steps")
    runs = bench.main(["--model", str(tiny_model_dirs["llama"]), "--drafts", "none", "ngram", "--batches", "1", "2",
                       "--max-tokens", "6", "--requests", "5", "--rounds", "2", "--out", str(tmp_path),
                       "--name", "loop"])
    for (_, _, draft), run in runs.items():
        assert set(run["closed_loop"]) == {"1", "2"}
        for batch, r in run["closed_loop"].items():
            assert r["rounds"] == 2 and r["tokens_per_s"] > 0 and 0 <= r["tail_s"] < r["seconds"]
            assert 0.0 <= r["full_drafted_share"] <= 1.0
            if batch == "1":  # one place: every turn is full, none is the tail
                assert r["tail_s"] == 0 and r["full_tokens_per_s"] > 0
    none = runs["float32", "on", "none"]["closed_loop"]
    assert all(r["full_drafted_share"] == 0 and r["full_drafted_tokens_per_s"] is None for r in none.values())
    table = (tmp_path / "loop.md").read_text()
    assert "Closed loop: 5 requests" in table and "| float32 | on | ngram | 2 |" in table
