"""The verify-step profile (`benchmarks/profile_step.py`) on the tiny llama: the split adds up, not timings."""

from __future__ import annotations

import json

import pytest

from specserve.kernels import cpu_attention

from ..conftest import make_tiny_model


def linear_params(model) -> int:
    """Weights of every decoder layer's q, k, v, o, gate, up and down projections, and the LM head."""
    c = json.loads((model / "config.json").read_text())
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    layer = 2 * h * h + 2 * kv * h + 3 * h * c["intermediate_size"]
    return c["num_hidden_layers"] * layer + c["vocab_size"] * h


def test_a_run_splits_every_step_and_reports_bandwidth(benchmark_script, tiny_model_dirs, tmp_path):
    bench = benchmark_script("profile_step")
    model = tiny_model_dirs["llama"]
    runs = bench.main(["--model", str(model), "--shapes", "1x1", "2x3", "3+1", "--prefix", "8", "--steps", "2",
                       "--out", str(tmp_path)])
    assert set(runs) == {("float32", p, a, "none") for p in ("off", "on") for a in ("sdpa", "grouped")}
    for run in runs.values():
        assert set(run["shapes"]) == {"1x1", "2x3", "3+1"}
        for r in run["shapes"].values():
            assert r["matmul"] > 0 and r["attention"] > 0 and r["wall_ms"] > 0
            parts = r["matmul"] + r["attention"] + r["other ops"] + r["outside ops"]
            # the profiled steps are not the timed ones: the parts add up to the median wall time, or exceed it
            assert parts == pytest.approx(r["wall_ms"]) or r["outside ops"] == 0
        assert run["weight_mb"] == pytest.approx(linear_params(model) * 4 / 1e6)
    saved = json.loads((tmp_path / f"profile-step-{model.name}.json").read_text())
    assert saved["read_bandwidth_gbs"] > 0
    table = (tmp_path / f"profile-step-{model.name}.md").read_text()
    assert "| float32 | on | grouped | none | 2x3 |" in table and "| float32 | off | sdpa | none | 3+1 |" in table


def test_quantized_weights_count_their_packed_bytes_and_kernels(benchmark_script, tiny_model_dirs, tmp_path):
    bench = benchmark_script("profile_step")
    model = tiny_model_dirs["llama"]
    runs = bench.main(["--model", str(model), "--shapes", "2x3", "--prefix", "8", "--steps", "2", "--prepack", "on",
                       "--attention", "grouped", "--quantization", "none", "int8", "int4", "--name", "q",
                       "--out", str(tmp_path)])
    mb = {q: runs["float32", "on", "grouped", q]["weight_mb"] for q in ("none", "int8", "int4")}
    params = linear_params(model)
    # int8: a byte per weight plus a bfloat16 scale per output row; int4 layers half that (the LM head stays int8)
    assert params / 1e6 < mb["int8"] < params * 1.2 / 1e6 and mb["int4"] < mb["int8"] < mb["none"] / 3
    # the int8 / int4 kernels are counted as matmuls, not as "other ops"
    assert all(runs["float32", "on", "grouped", q]["shapes"]["2x3"]["matmul"] > 0 for q in mb)
    assert "| float32 | on | grouped | int4 | 2x3 |" in (tmp_path / "q.md").read_text()


@pytest.mark.skipif(not cpu_attention.available(), reason="the CPU attention kernel did not build here")
def test_the_cpu_attention_kernel_is_counted_as_attention(benchmark_script, tmp_path):
    """With `--attention kernel` a verify step calls no SDPA op: its attention time is the kernel's."""
    bench = benchmark_script("profile_step")
    model = make_tiny_model("llama", tmp_path / "model", hidden=64)  # head dimension 16: the kernel takes it
    runs = bench.main(["--model", str(model), "--shapes", "2x3", "--prefix", "8", "--steps", "2", "--prepack", "on",
                       "--attention", "grouped", "kernel", "--out", str(tmp_path)])
    for attention in ("grouped", "kernel"):
        assert runs["float32", "on", attention, "none"]["shapes"]["2x3"]["attention"] > 0
