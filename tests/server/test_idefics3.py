"""Idefics3 family targets (Idefics3, SmolVLM): images cut into tiles, each tile a fixed number of
image tokens. Greedy speculative output equals the model's own `generate(do_sample=False)` with an
image, with two, and without; prefilled in chunks that cut through the tiles; in a batch with
another sequence. Tiny random models (float64, LM head scaled so greedy decoding has no near ties)
whose processors split images (no torchvision, no num2words)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from specserve.drafting.budget import TreeBudget
from specserve.drafting.eagle_head import ImageMode
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.errors import RequestError
from specserve.server.engine.idefics3 import Idefics3Adapter, ImageOnlySmolVLMProcessor, SmolVLMAdapter
from specserve.server.engine.outputs import image_tensors
from specserve.server.engine.prompts import MAX_PROCESSED_PIXELS, processed_size

from ..conftest import CHAT_TEMPLATE, build_tokenizer
from .test_engine_batch import run_batched
from .vlm_checks import MAX_NEW, check_draft_lm, check_eagle_batch, check_multi_turn

# (config, model, PIL image processor, processor, adapter)
FAMILIES = {
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor,
                 Idefics3Adapter),
    "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil,
                ImageOnlySmolVLMProcessor, SmolVLMAdapter),
}
# the tokens real checkpoints carry around each tile's image tokens
MARKERS = (["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
           + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])
TILE = 32  # pixels; 8x8 patches pixel-shuffled 2x2: 4 image tokens a tile
TOKENS_PER_TILE = 4


def make_tiny_idefics3(family: str, path: Path) -> Path:
    """A tiny random `family` model whose processor scales an image's longest edge to 64 pixels and
    cuts it into 32-pixel tiles: a 48x40 image becomes 2x2 tiles + the global one, 20 image tokens."""
    config_cls, model_cls, image_processor_cls, processor_cls, _ = FAMILIES[family]
    tokenizer = build_tokenizer(path)
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    processor = processor_cls(
        image_processor=image_processor_cls(size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE},
                                            do_image_splitting=True),
        tokenizer=tokenizer, image_seq_len=TOKENS_PER_TILE, chat_template=CHAT_TEMPLATE,
    )
    eos = tokenizer.eos_token_id
    config = config_cls(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TILE, patch_size=8),
        scale_factor=2, image_token_id=processor.image_token_id, pad_token_id=eos, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # random logits are nearly flat: sharpen them away from float ties
        for layer in model.model.text_model.layers:  # and attention, so every token's position matters
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    processor.save_pretrained(path)  # with the tokenizer, which now has the marker tokens
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tmp_path_factory) -> Path:
    return make_tiny_idefics3(family, tmp_path_factory.mktemp(family))


def engine_for(path: Path, draft: str = "none", **config) -> Engine:
    return Engine.from_config(EngineConfig(model=str(path), draft=draft, dtype="float64", batch_tree_tokens=0,
                                           tree=TreeBudget(depth=4, branching=3, draft_nodes=8), **config))


def picture(size=(48, 40)) -> Image.Image:
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((20, 40, 220), (0, 0, size[0] // 2, size[1] // 3))  # not uniform: tiles differ
    return image


def image_prompt(engine: Engine, sizes=((48, 40),), text="describe the red circle. a red circle, a blue"):
    parts = [{"type": "image", "image": picture(size)} for size in sizes]
    return engine.prepare_chat([{"role": "user", "content": parts + [{"type": "text", "text": text}]}])


def text_prompt(engine: Engine):
    return engine.prepare_chat([{"role": "user", "content": "the quick brown fox. the quick brown"}])


def reference_greedy(engine: Engine, prompt, max_new: int = MAX_NEW) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    out = engine.target.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new, **image_tensors(prompt.images, "cpu", torch.float64))
    return out[0, ids.shape[1]:].tolist()


def test_adapter_and_tiles(family, model_dir):
    engine = engine_for(model_dir)
    *_, processor_cls, adapter_cls = FAMILIES[family]
    assert type(engine.target.adapter) is adapter_cls
    assert isinstance(engine.prompts.processor, processor_cls)  # no torchvision or num2words here
    prompt = image_prompt(engine)
    # 48x40 -> longest edge 64 -> 64x64: 2x2 tiles + the global image
    assert prompt.images["pixel_values"].shape == (1, 5, 3, TILE, TILE)
    assert prompt.images["pixel_attention_mask"].shape == (1, 5, TILE, TILE)
    image_token_id = engine.target.adapter.image_token_id
    assert prompt.token_ids.count(image_token_id) == 5 * TOKENS_PER_TILE
    features = engine.target.adapter.image_features(image_tensors(prompt.images, "cpu", torch.float64))
    assert features.shape == (5 * TOKENS_PER_TILE, 64)
    assert not torch.allclose(features[:TOKENS_PER_TILE], features[TOKENS_PER_TILE:2 * TOKENS_PER_TILE])
    embeds = engine.target.embed(prompt)
    assert int(embeds.image_mask.sum()) == 5 * TOKENS_PER_TILE
    # a tall image: 2 rows x 1 column + global; two images: their tiles in prompt order
    two = image_prompt(engine, ((48, 40), (24, 60)))
    assert two.num_images == 2 and two.images["pixel_values"].shape[1] == 5 + 3
    assert two.token_ids.count(image_token_id) == 8 * TOKENS_PER_TILE


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_greedy_matches_generate(model_dir, draft):
    engine = engine_for(model_dir, draft)
    accepted = 0
    for prompt in (image_prompt(engine), text_prompt(engine), image_prompt(engine, ((48, 40), (24, 60)))):
        out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW))
        assert out.token_ids == reference_greedy(engine, prompt)
        accepted += out.metrics.accepted_draft_tokens
    if draft == "ngram":
        assert accepted > 0  # drafts were accepted, so trees were verified after the images


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_greedy_with_chunked_prefill(model_dir, draft):
    # 5-token chunks: every tile's 4 image tokens (and their markers) are split between chunks
    engine = engine_for(model_dir, draft, prefill_chunk_tokens=5)
    prompt = image_prompt(engine)
    seq = engine.start(prompt, SamplingParams(max_tokens=MAX_NEW))
    chunks = 0
    tokens = []
    while not seq.finished:
        out = engine.step_batch([seq])[0]
        assert not isinstance(out, Exception), out
        chunks += out is None
        tokens += out.token_ids if out is not None else []
    engine.release(seq)
    assert chunks >= 5  # the prompt took several turns
    assert tokens == reference_greedy(engine, prompt)


def test_greedy_batch_with_another_sequence(model_dir):
    engine = engine_for(model_dir, "ngram")
    prompts = [image_prompt(engine), text_prompt(engine), image_prompt(engine, ((24, 60),), "describe it")]
    assert len({len(p.token_ids) for p in prompts}) == 3
    params = SamplingParams(max_tokens=MAX_NEW)
    arrivals = [(0, prompts[0], params), (0, prompts[1], params), (1, prompts[2], params)]
    tokens, largest, _ = run_batched(engine, arrivals)
    assert largest == 3
    for i, prompt in enumerate(prompts):
        assert tokens[i] == reference_greedy(engine, prompt), i


def test_image_size_limits(model_dir):
    engine = engine_for(model_dir)
    image_processor = engine.prompts.processor.image_processor
    # the processor's own tile layout: 2x2 tiles for the 48x40 image, 2x1 for the tall one
    assert processed_size(image_processor, 40, 48) == (2 * TILE, 2 * TILE)
    assert processed_size(image_processor, 60, 24) == (2 * TILE, TILE)
    # a 24-megapixel photo is scaled to the longest edge first, so it passes
    assert 6000 * 4000 > MAX_PROCESSED_PIXELS
    engine.check_image_size(6000, 4000)
    with pytest.raises(RequestError, match="aspect ratio"):
        engine.check_image_size(2000, 40)
    with pytest.raises(RequestError, match="aspect ratio"):
        image_prompt(engine, ((40, 2000),))


def test_greedy_multi_turn_with_an_image(model_dir):
    """The image's tiles sit turns before the generation prompt: output == generate."""
    check_multi_turn(engine_for(model_dir, "ngram"), picture(), reference_greedy)


def test_greedy_with_a_draft_lm(model_dir, draft_lm_dir):
    """A separate text draft LM with the target's tokenizer (the tile markers included) drafts after
    tiled images: output == generate."""
    engine = engine_for(model_dir, str(draft_lm_dir(model_dir)))
    check_draft_lm(engine, [image_prompt(engine), text_prompt(engine)], reference_greedy)


@pytest.mark.parametrize("mode", list(ImageMode))
def test_greedy_with_a_random_eagle_head(model_dir, random_head_dir, mode):
    """An EAGLE/MSD head (random weights) in every image mode drafts after a tiled image, alone and in
    a batch with a text prompt; output == generate."""
    engine = engine_for(model_dir, str(random_head_dir(model_dir, mode)))
    prompts = [image_prompt(engine), text_prompt(engine)]
    check_eagle_batch(engine, prompts, reference_greedy)
