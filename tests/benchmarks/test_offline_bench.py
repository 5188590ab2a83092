"""The offline benchmark (`benchmarks/offline.py`), one whole small run per prompt kind on tiny models:
the step-time columns, the JSON, the PNG, and specserve's outputs equal to HF `generate` (float32)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def offline(benchmark_script):
    return benchmark_script("offline")


@pytest.mark.parametrize(("family", "prompts", "drafts"), [
    ("llava", "images", ["none", "ngram"]),  # easy-vqa test images; HF generate gets the same pixels
    ("llama", "code-prose", ["ngram"]),  # no `none`: no AR step time, so no speedup bounds
])
def test_a_whole_run_on_a_tiny_model(offline, benchmark_script, tiny_model_dirs, tmp_path, family, prompts, drafts):
    columns = benchmark_script("step_timing").COLUMNS
    offline.main(["--model", str(tiny_model_dirs[family]), "--prompts", prompts, "--num-prompts", "1",
                  "--drafts", *drafts, "--repeats", "1", "--max-new-tokens", "8", "--dtype", "float32",
                  "--threads", "1", "--out", str(tmp_path), "--name", "run"])

    assert Image.open(tmp_path / "run.png").format == "PNG"
    lines = (tmp_path / "run.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    assert all(f"| {column} |" in header for column in columns)
    methods = ["hf-ar", *(f"specserve-{draft}" for draft in drafts)]
    rows = [line for line in lines if line.startswith(tuple(f"| {method} |" for method in methods))]
    assert len(rows) == len(methods) and all(row.endswith("| 1/1 |") for row in rows)  # outputs == HF AR's

    raw = json.loads((tmp_path / "run.json").read_text())
    assert raw["hf-ar"]["step"] == {}
    for draft in drafts:
        step = raw[f"specserve-{draft}"]["step"]
        assert step["draft_ms"] > 0 and step["verify_ms"] > 0 and 0 <= step["other_share"] < 1
        if "none" in drafts:
            assert step["ideal_speedup"] >= step["step_speedup"] > 0
        else:
            assert step["ideal_speedup"] is None and step["step_speedup"] is None
    if "none" in drafts:  # plain decoding against itself: the same steps, one token each
        assert raw["specserve-none"]["step"]["step_speedup"] == pytest.approx(1.0)


def test_int8_draft_model_rows(offline, tiny_model_dirs, tmp_path):
    # --draft-quantization int8 adds HF assisted generation and specserve with the same int8 draft LM
    draft = tiny_model_dirs["qwen2"]
    raw = offline.main(["--model", str(tiny_model_dirs["llama"]), "--draft-model", str(draft),
                        "--draft-quantization", "int8", "--prompts", "code-prose", "--num-prompts", "1",
                        "--drafts", "none", str(draft), "--tree-mode", "chain", "--tree-depth", "3",
                        "--repeats", "1", "--max-new-tokens", "8", "--dtype", "float32", "--threads", "1",
                        "--out", str(tmp_path), "--name", "run"])
    methods = ["hf-ar", "hf-prompt-lookup", "hf-assisted", "hf-assisted-int8", "specserve-none",
               f"specserve-{draft.name}", f"specserve-{draft.name}-int8"]
    assert list(raw) == methods
    table = (tmp_path / "run.md").read_text()
    for method in methods:
        assert any(line.startswith(f"| {method} |") and line.endswith("| 1/1 |") for line in table.splitlines())
    assert raw[f"specserve-{draft.name}-int8"]["step"]["draft_ms"] > 0  # it drafted, and was profiled


def test_repeated_prompts_with_the_suffix_and_self_drafters(offline, tiny_model_dirs, tmp_path):
    raw = offline.main(["--model", str(tiny_model_dirs["llama"]), "--prompts", "repeated", "--num-prompts", "2",
                        "--drafts", "ngram", "suffix", "self:1", "--repeats", "1", "--max-new-tokens", "8",
                        "--dtype", "float32", "--threads", "1", "--out", str(tmp_path), "--name", "run"])
    methods = ["hf-ar", "hf-prompt-lookup", "specserve-ngram", "specserve-suffix", "specserve-self:1"]
    assert list(raw) == methods
    lines = (tmp_path / "run.md").read_text().splitlines()
    assert all(any(line.startswith(f"| {m} |") and line.endswith("| 2/2 |") for line in lines) for m in methods)


def test_every_repeat_starts_with_an_empty_suffix_store(offline):
    from specserve.drafting.budget import TreeBudget
    from specserve.drafting.suffix import SuffixProposer

    store = SuffixProposer(TreeBudget(), torch.device("cpu"))
    store.publish([1, 2, 3])
    offline.measure({}, {}, [None], max_new=1, repeats=1, stores=[store])
    assert store.shared.num_tokens == 0


def test_hf_torch_kernels_row_runs_hf_on_an_unpacked_copy(offline, tiny_model_dirs, tmp_path):
    # the other HF rows run on the engine's packed linear layers; this one on torch's own (float32:
    # oneDNN against MKL, the same model, so the output still equals AR's here)
    raw = offline.main(["--model", str(tiny_model_dirs["llama"]), "--prompts", "code-prose", "--num-prompts", "1",
                        "--drafts", "none", "--repeats", "1", "--max-new-tokens", "8", "--dtype", "float32",
                        "--threads", "1", "--hf-torch-kernels", "--out", str(tmp_path), "--name", "run"])
    assert list(raw) == ["hf-ar", "hf-prompt-lookup", "hf-ar-torch-kernels", "specserve-none"]
    assert len(raw["hf-ar-torch-kernels"]["throughputs"]) == 1 and raw["hf-ar-torch-kernels"]["throughputs"][0] > 0
    row = next(line for line in (tmp_path / "run.md").read_text().splitlines()
               if line.startswith("| hf-ar-torch-kernels |"))
    assert row.endswith("| 1/1 |")
