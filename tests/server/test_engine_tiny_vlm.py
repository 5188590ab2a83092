"""Greedy speculative decoding on the built-in tiny-vlm equals its plain greedy `generate`, with an
easy-vqa image in the prompt (the trained model writes long descriptions, where drafts land)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from specserve.drafting.eagle import EagleProposer
from specserve.drafting.eagle_head import ImageMode
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.metrics import SpecMetrics
from specserve.server.store.pull import pull
from specserve.server.training.tiny_vlm.data import load_split
from specserve.server.training.tiny_vlm.texts import DESCRIBE_PROMPTS

MAX_NEW = 64


@pytest.fixture(scope="module")
def base(store_cache, smollm2_dir) -> Engine:
    """tiny-vlm loaded once (float32, no drafter); each test builds its engine on this target."""
    folder = pull("tiny-vlm", store_cache, progress=False)
    return Engine.from_config(EngineConfig(str(folder), dtype="float32"))


def engine_with(base: Engine, config: EngineConfig) -> Engine:
    return Engine(config, base.target, base.tokenizer, base.prompts.processor)


def test_auto_draft_on_tiny_vlm_is_its_msd_head(base, store_cache):
    engine = engine_with(base, replace(base.config, model="tiny-vlm", draft="auto", cache_dir=str(store_cache)))
    assert engine.config.draft == "tiny-vlm-msd"
    assert isinstance(engine.proposer, EagleProposer)
    assert engine.proposer.head.settings.image_mode is ImageMode.DECOUPLED


@pytest.mark.parametrize("draft", ["none", "ngram", "tiny-vlm-msd"])
def test_tiny_vlm_greedy_speculative_equals_generate(base, draft):
    # batch_tree_tokens=0: proposals verified whole, so the acceptance checked below is the drafter's
    engine = engine_with(base, replace(base.config, draft=draft, batch_tree_tokens=0))
    split = load_split("test")
    metrics = SpecMetrics()
    for index in (0, 1):
        image = Image.open(split[index].path).convert("RGB")
        prompt = engine.prepare_chat([{"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "text", "text": DESCRIBE_PROMPTS[0]},
        ]}])
        assert prompt.num_images == 1
        out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW))
        ids = torch.tensor([prompt.token_ids])
        expected = engine.target.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **prompt.images,
            do_sample=False, max_new_tokens=MAX_NEW,
        )[0, ids.shape[1]:].tolist()
        assert out.token_ids == expected
        metrics.merge(out.metrics)
    if draft == "ngram":
        assert metrics.accepted_draft_tokens > 0
    if draft == "tiny-vlm-msd":  # trained on the target's own descriptions: most drafts land
        assert metrics.mean_accepted_length > 3.0
