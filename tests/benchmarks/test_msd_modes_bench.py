"""The MSD-modes benchmark (`benchmarks/msd_modes.py`), one whole small run on the tiny LLaVA with a
random EAGLE head: greedy outputs equal plain decoding's, the step-time columns, the JSON, the PNG."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from transformers import AutoConfig

from specserve.drafting.eagle_head import HeadConfig, ImageMode, new_head, save_head


def test_a_whole_run_with_a_random_head(benchmark_script, tiny_model_dirs, tmp_path):
    msd_modes, columns = benchmark_script("msd_modes"), benchmark_script("step_timing").COLUMNS
    model = tiny_model_dirs["llava"]
    save_head(new_head(AutoConfig.from_pretrained(model).text_config, HeadConfig(image_mode=ImageMode.FUSED)),
              tmp_path / "head")
    results = msd_modes.main(["--model", str(model), "--heads", str(tmp_path / "head"), "--dtype", "float32",
                              "--image-prompts", "1", "--text-prompts", "1", "--max-tokens", "8",
                              "--temperatures", "0", "--tree-depth", "3", "--tree-nodes", "6", "--threads", "1",
                              "--out", str(tmp_path / "out")])

    assert Image.open(tmp_path / "out" / "msd_modes.png").format == "PNG"
    assert json.loads((tmp_path / "out" / "msd_modes.json").read_text())["sets"] == results["sets"]
    assert set(results["sets"]) == {"images@0", "text@0"}
    for rows in results["sets"].values():
        assert set(rows) == {"ar", "fused"}
        for row in rows.values():
            assert row["outputs_equal_ar"] == 1  # greedy: lossless whatever the head proposes
            assert row["draft_ms"] > 0 and row["verify_ms"] > 0 and row["ideal_speedup"] >= row["step_speedup"] > 0
    table = (tmp_path / "out" / "msd_modes.md").read_text()
    assert all(f"| {column} |" in table for column in columns)
    assert "| images | 0 | fused |" in table and "| text | 0 | ar |" in table


def test_two_heads_with_one_mode_are_refused(benchmark_script, tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["llava"]
    for name in ("a", "b"):
        save_head(new_head(AutoConfig.from_pretrained(model).text_config, HeadConfig(image_mode=ImageMode.FUSED)),
                  tmp_path / name)
    with pytest.raises(ValueError, match="image mode 'fused'"):
        benchmark_script("msd_modes").main(["--model", str(model), "--heads", str(tmp_path / "a"),
                                            str(tmp_path / "b"), "--dtype", "float32", "--out", str(tmp_path)])
