"""Greedy losslessness on a real pretrained model: SmolLM2-135M-Instruct (fp32), from the store."""

from __future__ import annotations

import pytest
import torch

from specserve.drafting.budget import TreeBudget
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams

PROMPTS = [
    "Repeat this sentence twice: the quick brown fox jumps over the lazy dog.",
    "Write a Python function that returns the sum of a list of numbers.",
    "What is the capital of France? Answer in one sentence.",
]
MAX_NEW = 48


@pytest.fixture(scope="module")
def base_engine(smollm2_dir) -> Engine:
    return Engine.from_config(EngineConfig(str(smollm2_dir), dtype="float32"))


@pytest.fixture(scope="module")
def references(base_engine) -> list[list[int]]:
    refs = []
    for text in PROMPTS:
        ids = torch.tensor([base_engine.prepare_chat([{"role": "user", "content": text}]).token_ids])
        out = base_engine.target.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW
        )
        refs.append(out[0, ids.shape[1]:].tolist())
    return refs


@pytest.mark.parametrize("draft", ["none", "ngram", "suffix", "self:4"])
def test_smollm2_greedy_matches_generate(base_engine, references, draft):
    config = EngineConfig(base_engine.config.model, draft=draft, tree=TreeBudget(depth=5, branching=4, draft_nodes=16),
                          batch_tree_tokens=0)  # proposals verified whole: the acceptance checked is n-gram's
    engine = Engine(config, base_engine.target, base_engine.tokenizer)
    accepted = 0
    for text, expected in zip(PROMPTS, references):
        prompt = engine.prepare_chat([{"role": "user", "content": text}])
        out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW))
        assert out.token_ids == expected, text
        assert out.text == engine.tokenizer.decode(expected, skip_special_tokens=True)
        accepted += out.metrics.accepted_draft_tokens
    if draft in ("ngram", "suffix"):
        assert accepted > 0  # the repeat prompt must let prompt lookup land some drafts
