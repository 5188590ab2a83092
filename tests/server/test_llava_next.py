"""LLaVA-NeXT and LLaVA-OneVision targets ("anyres" tiles): greedy speculative output equals the
model's own `generate(do_sample=False)` with one image, two images and none, prefilled whole or in
chunks that cut through an image, alone or in a batch; the image-size check bounds anyres processing.
Tiny random models (float64, LM head scaled so greedy decoding has no near ties) whose 32x32 tiles and
small grid pinpoints cut a 48x40 image into 4 tiles + the whole image; processors without torchvision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from specserve.drafting.budget import TreeBudget
from specserve.drafting.eagle_head import ImageMode
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.errors import RequestError
from specserve.server.engine.llava_next import (
    ImageOnlyLlavaOnevisionProcessor,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
)
from specserve.server.engine.outputs import image_tensors
from specserve.server.engine.prompts import PromptBuilder, processed_size

from ..conftest import CHAT_TEMPLATE, build_tokenizer
from .test_engine_batch import run_batched
from .vlm_checks import MAX_NEW, check_draft_lm, check_eagle_batch, check_multi_turn

PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # (height, width) canvases of 32x32 tiles
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)  # 4x4 patches per tile
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
FAMILIES = ["llava_next", "llava_onevision"]
ADAPTER_CLASSES = {"llava_next": LlavaNextAdapter, "llava_onevision": LlavaOnevisionAdapter}


def tiny_processor(family: str, tokenizer, pinpoints=PINPOINTS):
    if family == "llava_next":  # a CLIP tower: one CLS row per tile, dropped by the "default" strategy
        return LlavaNextProcessor(
            image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 32}, image_grid_pinpoints=pinpoints,
                                                       crop_size={"height": 32, "width": 32}),
            tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return ImageOnlyLlavaOnevisionProcessor(  # a SigLIP tower: no CLS, every row kept ("full")
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                        image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer, num_image_tokens=16, vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)


def make_tiny_llava_next(family: str, path: Path) -> Path:
    """A tiny random `family` model: 32x32 tiles of 4x4 patches, grid pinpoints up to 64x64."""
    tokenizer = build_tokenizer(path)
    eos = tokenizer.eos_token_id
    processor = tiny_processor(family, tokenizer)
    text = dict(vocab_size=len(tokenizer), eos_token_id=eos, bos_token_id=eos, pad_token_id=eos, **TEXT)
    common = dict(image_grid_pinpoints=PINPOINTS, image_token_id=processor.image_token_id, tie_word_embeddings=False)
    if family == "llava_next":
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(**TOWER), text_config=LlamaConfig(**text),
                                 vision_feature_select_strategy="default", **common)
        model_cls = LlavaNextForConditionalGeneration
    else:
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**TOWER), text_config=Qwen2Config(**text),
                                      vision_feature_select_strategy="full", **common)
        model_cls = LlavaOnevisionForConditionalGeneration
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # random logits are nearly flat: sharpen them away from float ties
        for layer in model.model.language_model.layers:  # and attention, so that positions matter
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory) -> Path:
    return make_tiny_llava_next(request.param, tmp_path_factory.mktemp(request.param))


def engine_for(path: Path, draft: str = "none", **config) -> Engine:
    return Engine.from_config(EngineConfig(model=str(path), draft=draft, dtype="float64", batch_tree_tokens=0,
                                           tree=TreeBudget(depth=4, branching=3, draft_nodes=8), **config))


def picture(size=(48, 40), color=(200, 30, 30)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((20, 40, 220), (0, 0, size[0] // 2, size[1] // 3))  # not uniform: tiles differ
    return image


def image_prompt(engine: Engine, sizes=((48, 40),), text="describe the red circle. a red circle, a blue"):
    parts = [{"type": "image", "image": picture(size)} for size in sizes]
    return engine.prepare_chat([{"role": "user", "content": [*parts, {"type": "text", "text": text}]}])


def text_prompt(engine: Engine):
    return engine.prepare_chat([{"role": "user", "content": "the quick brown fox. the quick brown"}])


def reference_greedy(engine: Engine, prompt, max_new: int = MAX_NEW) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    out = engine.target.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new, **image_tensors(prompt.images, "cpu", torch.float64))
    return out[0, ids.shape[1]:].tolist()


def test_adapter_and_image_tokens(model_dir):
    engine = engine_for(model_dir)
    family = engine.target.model.config.model_type
    adapter = engine.target.adapter
    assert type(adapter) is ADAPTER_CLASSES[family]
    if family == "llava_onevision":
        assert isinstance(engine.prompts.processor, ImageOnlyLlavaOnevisionProcessor)  # no torchvision here
    counts = []
    for size in [(48, 40), (30, 70)]:
        prompt = image_prompt(engine, [size])
        assert prompt.images["pixel_values"].shape[1] >= 3  # the whole image + 2 or more tiles
        features = adapter.image_features(image_tensors(prompt.images, "cpu", torch.float64))
        counts.append(prompt.token_ids.count(adapter.image_token_id))
        assert counts[-1] == features.shape[0] > 2 * 16  # more rows than the whole-image tile alone
    assert counts[0] != counts[1]  # anyres: the token count follows the image's shape


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_greedy_matches_generate(model_dir, draft):
    engine = engine_for(model_dir, draft)
    accepted = 0
    for prompt in (image_prompt(engine), image_prompt(engine, [(48, 40), (30, 70)]), text_prompt(engine)):
        out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW))
        assert out.token_ids == reference_greedy(engine, prompt)
        accepted += out.metrics.accepted_draft_tokens
    if draft == "ngram":
        assert accepted > 0  # drafts were accepted, so verify ran trees after the images


def test_the_image_matters(model_dir):
    """Another picture gives another answer: the equality tests above would catch misplaced features."""
    engine = engine_for(model_dir)
    red = engine.prepare_chat([{"role": "user", "content": [{"type": "image", "image": picture()}]}])
    green = engine.prepare_chat([{"role": "user", "content": [
        {"type": "image", "image": picture(color=(30, 200, 30))}]}])
    assert red.token_ids == green.token_ids
    params = SamplingParams(max_tokens=MAX_NEW)
    assert engine.generate(red, params).token_ids != engine.generate(green, params).token_ids


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_greedy_with_chunked_prefill(model_dir, draft):
    # 5-token chunks: the image's tokens are split over many chunks
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
    assert chunks >= 10  # the prompt took many turns
    assert tokens == reference_greedy(engine, prompt)


def test_greedy_batch_with_another_sequence(model_dir):
    engine = engine_for(model_dir, "ngram")
    prompts = [image_prompt(engine), image_prompt(engine, [(30, 70)], "describe it"), text_prompt(engine)]
    params = SamplingParams(max_tokens=MAX_NEW)
    arrivals = [(0, prompts[0], params), (0, prompts[1], params), (1, prompts[2], params)]
    tokens, largest, _ = run_batched(engine, arrivals)
    assert largest == 3
    for i, prompt in enumerate(prompts):
        assert tokens[i] == reference_greedy(engine, prompt), i


@pytest.mark.parametrize("family", FAMILIES)
def test_image_size_bounds(tmp_path, family):
    """The processed size of an anyres image is its best grid pinpoint; extreme shapes and pinpoints
    beyond the server's pixel limit are refused before the image is decoded."""
    tokenizer = build_tokenizer(tmp_path)
    builder = PromptBuilder(tokenizer, tiny_processor(family, tokenizer), multimodal=True)
    assert processed_size(builder.processor.image_processor, 40, 48) == (64, 64)
    assert processed_size(builder.processor.image_processor, 100, 30) == (64, 32)
    builder.check_image_size(48, 40)
    for width, height in [(100000, 1), (1, 100000)]:
        with pytest.raises(RequestError, match="aspect ratio"):
            builder.check_image_size(width, height)
    huge = PromptBuilder(tokenizer, tiny_processor(family, tokenizer, [[8192, 8192]]), multimodal=True)
    with pytest.raises(RequestError, match="8192x8192 pixels"):
        huge.check_image_size(48, 40)


def test_greedy_multi_turn_with_an_image(model_dir):
    """The image sits turns before the generation prompt: output == generate."""
    check_multi_turn(engine_for(model_dir, "ngram"), picture(), reference_greedy)


def test_greedy_with_a_draft_lm(model_dir, draft_lm_dir):
    """A separate text draft LM (the target's tokenizer) drafts after images: output == generate."""
    engine = engine_for(model_dir, str(draft_lm_dir(model_dir)))
    check_draft_lm(engine, [image_prompt(engine), text_prompt(engine)], reference_greedy)


@pytest.mark.parametrize("mode", list(ImageMode))
def test_greedy_with_a_random_eagle_head(model_dir, random_head_dir, mode):
    """An EAGLE/MSD head (random weights) in every image mode drafts after an anyres image, alone and
    in a batch with a text prompt; output == generate."""
    engine = engine_for(model_dir, str(random_head_dir(model_dir, mode)))
    prompts = [image_prompt(engine), text_prompt(engine)]
    check_eagle_batch(engine, prompts, reference_greedy)
