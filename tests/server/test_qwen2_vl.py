"""Qwen2-VL family targets (M-RoPE): greedy speculative output equals the model's own
`generate(do_sample=False)` with an image and without, prefilled whole or in chunks that cut through
the image, alone or in a batch with a sequence of another length and rope delta. Tiny random models
(float64, LM head scaled so greedy decoding has no near ties) with an image-only processor built
without torchvision."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from specserve.drafting.budget import TreeBudget, TreeMode
from specserve.drafting.eagle_head import ImageMode
from specserve.kernels.sampling import process_logits
from specserve.kernels.tree import DraftTree
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.errors import RequestError
from specserve.server.engine.outputs import image_tensors
from specserve.server.engine.qwen2_vl import ImageOnlyQwen2VLProcessor, ImageOnlyQwen3VLProcessor, Qwen2VLAdapter

from ..conftest import CHAT_TEMPLATE, build_tokenizer, make_tiny_model
from .test_engine_batch import run_batched
from .test_engine_sampling import SAMPLES, chi_square_ok
from .vlm_checks import MAX_NEW, check_draft_lm, check_eagle_batch

# (config, model, processor, vision tower): 8x8 patches merged 2x2 into the LM's 64 dimensions
VISION = dict(depth=2, num_heads=4, patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, ImageOnlyQwen2VLProcessor,
                 VISION | dict(embed_dim=32, hidden_size=64, mlp_ratio=2)),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, ImageOnlyQwen2VLProcessor,
                   VISION | dict(hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=32,
                                 fullatt_block_indexes=[1])),
    # deepstack: the tower's layers 0 and 1, merged, are added to the decoder's first two layers' outputs
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, ImageOnlyQwen3VLProcessor,
                 VISION | dict(hidden_size=32, out_hidden_size=64, intermediate_size=64, num_position_embeddings=64,
                               deepstack_visual_indexes=[0, 1])),
}


def make_tiny_qwen_vl(family: str, path: Path) -> Path:
    """A tiny random `family` model with 8x8 patches merged 2x2: a 48x40 image becomes a 6x4 patch
    grid, 6 image tokens spanning 3 positions."""
    tokenizer = build_tokenizer(path)
    eos = tokenizer.eos_token_id
    config_cls, model_cls, processor_cls, vision = FAMILIES[family]
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8,
                                                 merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )
    config = config_cls(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            # head_dim 16: 8 rotary frequencies split over the temporal / height / width rows
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
        ),
        vision_config=vision,
        image_token_id=processor.image_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # random logits are nearly flat: sharpen them away from float ties
        # random attention is nearly uniform, so positions would barely change the output: sharpen it
        # (checked: with 10x, decoding an image prompt at plain 1-row positions changes 20 of 30 tokens)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def model_dir(request, tmp_path_factory) -> Path:
    return make_tiny_qwen_vl(request.param, tmp_path_factory.mktemp(request.param))


def engine_for(path: Path, draft: str = "none", **config) -> Engine:
    return Engine.from_config(EngineConfig(model=str(path), draft=draft, dtype="float64", batch_tree_tokens=0,
                                           tree=TreeBudget(depth=4, branching=3, draft_nodes=8), **config))


def image_prompt(engine: Engine, size=(48, 40), text="describe the red circle. a red circle, a blue"):
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((20, 40, 220), (0, 0, size[0] // 2, size[1] // 3))  # not uniform: patches differ
    return engine.prepare_chat([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": text},
    ]}])


def text_prompt(engine: Engine):
    return engine.prepare_chat([{"role": "user", "content": "the quick brown fox. the quick brown"}])


def reference_greedy(engine: Engine, prompt, max_new: int = MAX_NEW) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    kwargs = {}
    if prompt.images is not None:  # generate computes the M-RoPE positions itself from these
        kwargs = image_tensors(prompt.images, "cpu", torch.float64) | {
            "mm_token_type_ids": (ids == engine.target.adapter.image_token_id).long()}
    out = engine.target.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def test_adapter_and_image_prompt(model_dir):
    engine = engine_for(model_dir)
    assert isinstance(engine.target.adapter, Qwen2VLAdapter)
    assert isinstance(engine.prompts.processor, FAMILIES[engine.target.model.config.model_type][2])  # no torchvision
    prompt = image_prompt(engine)
    assert prompt.num_images == 1 and prompt.images["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert prompt.token_ids.count(engine.target.adapter.image_token_id) == 6
    embeds = engine.target.embed(prompt)
    assert embeds.rope_delta == -3  # 6 image tokens take max(2, 3) = 3 positions
    assert embeds.chunk_inputs(0, len(prompt.token_ids))["position_ids"].shape == (3, 1, len(prompt.token_ids))
    assert engine.target.embed(text_prompt(engine)).rope_delta == 0


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_greedy_matches_generate(model_dir, draft):
    engine = engine_for(model_dir, draft)
    accepted = 0
    for prompt in (image_prompt(engine), text_prompt(engine)):
        out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW))
        assert out.token_ids == reference_greedy(engine, prompt)
        accepted += out.metrics.accepted_draft_tokens
    if draft == "ngram":
        assert accepted > 0  # drafts were accepted, so tree positions after the image were used


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_greedy_with_chunked_prefill(model_dir, draft):
    # 5-token chunks: the image's 6 tokens are split between chunks
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
    assert chunks >= 3  # the prompt took several turns
    assert tokens == reference_greedy(engine, prompt)


def test_greedy_batch_of_different_lengths_and_deltas(model_dir):
    engine = engine_for(model_dir, "ngram")
    prompts = [image_prompt(engine), image_prompt(engine, (80, 24), "describe it"), text_prompt(engine)]
    deltas = [engine.target.embed(p).rope_delta for p in prompts]
    assert len(set(deltas)) == 3 and len({len(p.token_ids) for p in prompts}) == 3
    params = SamplingParams(max_tokens=MAX_NEW)
    arrivals = [(0, prompts[0], params), (0, prompts[1], params), (1, prompts[2], params)]
    tokens, largest, _ = run_batched(engine, arrivals)
    assert largest == 3
    for i, prompt in enumerate(prompts):
        assert tokens[i] == reference_greedy(engine, prompt), i


def test_verify_needs_the_rope_delta(model_dir):
    """The tree's positions carry the sequence's rope delta: verified without it, the same tree scores
    differently (so the equality tests above could fail)."""
    engine = engine_for(model_dir)
    target = engine.target
    embeds = target.embed(image_prompt(engine))
    length = embeds.embeds.shape[1]
    cache = target.new_cache(1, length + 4)
    target.prefill(embeds.embeds, cache, 0, 0, embeds.chunk_inputs(0, length))
    tree = DraftTree.from_parents(torch.tensor([[5, 6, 7]]), torch.tensor([[-1, 0, 0]]))
    right = target.verify(tree, cache, [0], [length], [embeds.rope_delta]).logits
    wrong = target.verify(tree, cache, [0], [length]).logits
    assert not torch.allclose(right, wrong)


@pytest.fixture(scope="module")
def text_draft_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 text LM with the same tokenizer: a separate draft LM for the VLM target."""
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("draft-lm"), seed=1)


def test_greedy_with_a_draft_lm(model_dir, text_draft_dir):
    """A separate text draft LM drafts for an M-RoPE target (its own 1-row positions: what it proposes
    is verified at the target's positions), an image prompt and a text prompt."""
    engine = engine_for(model_dir, str(text_draft_dir))
    check_draft_lm(engine, [image_prompt(engine), text_prompt(engine)], reference_greedy)


@pytest.mark.parametrize("mode", list(ImageMode))
def test_greedy_with_a_random_eagle_head(model_dir, random_head_dir, mode):
    """An EAGLE/MSD head (random weights) in every image mode drafts for an M-RoPE target with an
    image, alone and in a batch with a text prompt; output == generate."""
    engine = engine_for(model_dir, str(random_head_dir(model_dir, mode)))
    prompts = [image_prompt(engine), text_prompt(engine)]
    check_eagle_batch(engine, prompts, reference_greedy)



@pytest.fixture(scope="module")
def qwen2_5_vl_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen_vl("qwen2_5_vl", tmp_path_factory.mktemp("qwen2_5_vl-sampling"))


@pytest.fixture(scope="module")
def own_lm_draft_dir(qwen2_5_vl_dir, tmp_path_factory) -> Path:
    """A text-only Qwen2 LM holding the target's own language-model weights (1-row RoPE, image
    placeholders seen as tokens): a draft LM close enough to the target to be accepted often."""
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen2_5_vl_dir)
    text = vlm.config.text_config
    config = Qwen2Config(**{key: getattr(text, key) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "eos_token_id", "bos_token_id", "pad_token_id")},
        tie_word_embeddings=False)
    draft = Qwen2ForCausalLM(config)
    draft.model.load_state_dict(vlm.model.language_model.state_dict())
    draft.lm_head.load_state_dict(vlm.lm_head.state_dict())
    path = tmp_path_factory.mktemp("own-lm-draft")
    draft.save_pretrained(path)
    build_tokenizer(path)
    return path


@pytest.mark.parametrize("mode", [TreeMode.DYNAMIC, TreeMode.CHAIN])
def test_sampling_with_an_image_follows_the_target(qwen2_5_vl_dir, own_lm_draft_dir, mode):
    """Seeded sampling (temperature 2, top-k 3: at most 9 pairs) after an image prompt, drafted by a
    draft LM (dynamic trees, or a chain sampled from q): the first two tokens follow the target's own
    processed distribution at its M-RoPE positions (chi-square, the engine sampling tests' statistic),
    with drafts accepted on the way."""
    tree = TreeBudget(depth=3, branching=2, draft_nodes=6, mode=mode)
    engine = Engine.from_config(EngineConfig(model=str(qwen2_5_vl_dir), draft=str(own_lm_draft_dir),
                                             dtype="float64", batch_tree_tokens=0, tree=tree))
    prompt = image_prompt(engine)
    params = SamplingParams(max_tokens=3, temperature=2.0, top_k=3, ignore_eos=True)
    model, ids = engine.target.model, torch.tensor([prompt.token_ids])
    images = image_tensors(prompt.images, "cpu", torch.float64)

    @torch.no_grad()
    def processed(tokens: list[int]) -> torch.Tensor:  # the target's next-token distribution after them
        context = torch.cat([ids, torch.tensor([tokens], dtype=torch.long)], dim=1)
        types = (context == engine.target.adapter.image_token_id).long()
        logits = model(input_ids=context, mm_token_type_ids=types, **images).logits[0, -1].double()
        return process_logits(logits, params.temperature, params.top_p, params.top_k).double()

    first = processed([])
    pairs = {(a, b): float(first[a] * p_b) for a in first.nonzero().flatten().tolist()
             for b, p_b in enumerate(processed([a]).tolist()) if p_b > 0}
    counts = dict.fromkeys(pairs, 0)
    accepted = 0
    for seed in range(SAMPLES):
        out = engine.generate(prompt, replace(params, seed=seed))
        counts[out.token_ids[0], out.token_ids[1]] += 1  # a pair outside the support fails here
        accepted += out.metrics.accepted_draft_tokens
    ok, stat = chi_square_ok(torch.tensor(list(counts.values())), torch.tensor(list(pairs.values())))
    assert ok, f"chi-square {stat:.1f}: sampled pairs do not follow the target's distribution"
    assert accepted > 0  # speculation was tested, not only the target's own sampling


def test_qwen3_vl_deepstack_reaches_the_decoder(tmp_path):
    """Qwen3-VL's deepstack features change the prompt's hidden states (so the equality tests above
    could fail without them), and a prefill cut through the image into chunks gives the same states
    as one whole prefill (each chunk takes its own rows of the features)."""
    engine = engine_for(make_tiny_qwen_vl("qwen3_vl", tmp_path))
    target = engine.target
    embeds = target.embed(image_prompt(engine))
    length = embeds.embeds.shape[1]
    assert len(embeds.deepstack) == 2 and embeds.deepstack[0].shape == (6, 64)

    def prefill(cuts: list[int], deepstack: bool = True) -> torch.Tensor:
        cache, states = target.new_cache(1, length), []
        for start, end in zip(cuts, cuts[1:]):
            inputs = embeds.chunk_inputs(start, end)
            if not deepstack:
                inputs = {k: v for k, v in inputs.items() if k not in ("visual_pos_masks", "deepstack_visual_embeds")}
            states.append(target.prefill(embeds.embeds[:, start:end], cache, 0, start, inputs))
        return torch.cat(states, dim=1)

    whole = prefill([0, length])
    image_start = int(embeds.image_mask[0].nonzero()[0])
    assert torch.allclose(prefill([0, image_start + 2, image_start + 5, length]), whole)
    assert not torch.allclose(prefill([0, length], deepstack=False), whole)


def test_images_side_by_side_are_refused_when_prepared(model_dir):
    """A template that leaves nothing between two images makes one run of image tokens the rotary
    index would read as one image: refused with a RequestError (a 400) before the request is queued,
    not a failure in prefill. With text between them both are served."""
    engine = engine_for(model_dir)
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    adjacent = [{"type": "image", "image": image}, {"type": "image", "image": image}, {"type": "text", "text": "hi"}]
    with pytest.raises(RequestError, match="side by side"):
        engine.prepare_chat([{"role": "user", "content": adjacent}])
    apart = [adjacent[0], {"type": "text", "text": "and"}, adjacent[1], adjacent[2]]
    prompt = engine.prepare_chat([{"role": "user", "content": apart}])
    assert prompt.num_images == 2
    assert engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW)).token_ids == reference_greedy(engine, prompt)
