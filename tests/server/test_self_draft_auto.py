"""`--draft self:auto`: the early-exit depths it tries, the choice on injected speeds, and a whole
engine that calibrates at load and still reproduces the target's greedy output."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from specserve.server.engine import Engine, calibration
from specserve.server.engine.calibration import choose_self_layers, self_layer_candidates
from specserve.server.engine.config import EngineConfig, SamplingParams

PROMPT = "the quick brown fox"


@pytest.mark.parametrize(("layers", "candidates"), [
    (30, [4, 8, 15, 22]),  # SmolLM2-135M
    (28, [4, 7, 14, 21]),  # Qwen2.5-1.5B
    (4, [1, 2, 3]),
    (2, [1]),  # never every layer: that draft costs as much as the target
    (1, [1]),  # ... unless there is nothing else
])
def test_candidates_spread_over_the_layers(layers, candidates):
    assert self_layer_candidates(layers) == candidates


def test_the_fastest_candidate_wins_and_each_is_measured_once():
    measured = []

    def speed(layers: int) -> float:
        measured.append(layers)
        return {4: 5.0, 8: 7.5, 15: 6.0, 22: 3.0}[layers]

    chosen, speeds = choose_self_layers([4, 8, 15, 22], speed)
    assert chosen == 8
    assert speeds == {4: 5.0, 8: 7.5, 15: 6.0, 22: 3.0}
    assert measured == [4, 8, 15, 22]


def test_a_tie_goes_to_fewer_layers():
    assert choose_self_layers([2, 4, 6], {2: 3.0, 4: 9.0, 6: 9.0}.get)[0] == 4


@pytest.fixture(scope="module")
def four_layer_llama(tiny_model_dirs, tmp_path_factory):
    """The tiny Llama's tokenizer with a 4-layer random model: three early-exit depths to choose from."""
    path = tmp_path_factory.mktemp("llama-4-layers")
    shutil.copytree(tiny_model_dirs["llama"], path, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = 4
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def load(path, draft: str) -> Engine:
    return Engine.from_config(EngineConfig(model=str(path), draft=draft, dtype="float64", batch_tree_tokens=0))


def reference_greedy(engine: Engine, token_ids: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([token_ids])
    out = engine.target.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new)
    return out[0, ids.shape[1]:].tolist()


def test_self_auto_calibrates_at_load_and_stays_lossless(four_layer_llama, caplog):
    with caplog.at_level(logging.INFO, logger="specserve"):
        engine = load(four_layer_llama, "self:auto")
    line = next(r.getMessage() for r in caplog.records if "self-draft calibration" in r.getMessage())
    layers = engine.proposer.model.config.num_hidden_layers
    assert line.startswith("self-draft calibration (greedy tokens/s by early layers): {1: ")
    assert line.endswith(f"-> {layers} of 4 layers") and "2: " in line and "3: " in line
    assert layers in (1, 2, 3) and engine.target.config.num_hidden_layers == 4  # the target is whole
    prompt = engine.prepare_text(PROMPT)
    out = engine.generate(prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    assert out.token_ids == reference_greedy(engine, prompt.token_ids, 30)
    assert out.metrics.verify_steps > 0  # it drafted


def test_self_auto_drafts_with_the_measured_choice(four_layer_llama, monkeypatch):
    speeds = {1: 10.0, 2: 30.0, 3: 20.0}
    monkeypatch.setattr(calibration, "greedy_tokens_per_second",
                        lambda target, proposer, tree, prompt, max_tokens: speeds[
                            proposer.model.config.num_hidden_layers])
    assert load(four_layer_llama, "self:auto").proposer.model.config.num_hidden_layers == 2


@pytest.mark.parametrize(("family", "draft", "message"), [
    ("llama", "self:0", r"needs 1\.\.2 layers of this model, got 0"),
    ("llama", "self:-1", "takes a number of layers or 'auto'"),
    ("llama", "self:", "takes a number of layers or 'auto'"),
    ("llama", "self:Auto", "takes a number of layers or 'auto'"),
    ("llava", "self:auto", "text-only models"),
])
def test_bad_self_drafts_fail_at_load(tiny_model_dirs, family, draft, message):
    with pytest.raises(ValueError, match=message):
        load(tiny_model_dirs[family], draft)
