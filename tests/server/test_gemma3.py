"""Gemma 3 targets: greedy speculative output equals the model's own `generate(do_sample=False)` (given
the processor's `token_type_ids`, so each image is seen bidirectionally in prefill) with one image, two
images and none, prefilled whole or in chunks smaller than an image, alone or in a batch. A tiny random
model (float64, a SigLIP tower of 4x4 patches pooled to 4 tokens per image, sliding-window and full
layers, LM head and attention sharpened so greedy decoding has no near ties)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from specserve.drafting.budget import TreeBudget, TreeMode
from specserve.drafting.eagle_head import ImageMode
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.gemma3 import Gemma3Adapter
from specserve.server.engine.outputs import image_tensors

from ..conftest import CHAT_TEMPLATE, build_tokenizer, make_tiny_model
from .test_engine_batch import run_batched
from .vlm_checks import MAX_NEW, check_draft_lm, check_eagle_batch, check_multi_turn

IMAGE_TOKENS = 4  # per image: 4x4 patches average-pooled 2x2
WINDOW = 256  # sliding window of the even layers: longer than every sequence here


def gemma3_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """The tests' byte-level BPE tokenizer plus Gemma 3's image delimiters (<start_of_image>, which
    the chat template writes and the processor expands, and <end_of_image>)."""
    backend = build_tokenizer(path).backend_tokenizer
    backend.add_special_tokens(["<start_of_image>", "<end_of_image>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>",
        extra_special_tokens={"image_token": "<image>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"},
    )
    tokenizer.chat_template = CHAT_TEMPLATE.replace("<image>", "<start_of_image>")
    return tokenizer


def make_tiny_gemma3(path: Path, window: int = WINDOW) -> Path:
    tokenizer = gemma3_tokenizer(path)
    eos = tokenizer.eos_token_id
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
                                tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                                image_seq_length=IMAGE_TOKENS)
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
            max_position_embeddings=512, sliding_window=window, layer_types=["sliding_attention", "full_attention"],
            eos_token_id=eos, bos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
        ),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        mm_tokens_per_image=IMAGE_TOKENS, image_token_index=tokenizer.image_token_id,
        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.1)  # initialised to zeros
        model.lm_head.weight.mul_(40)  # random logits are nearly flat: sharpen them away from float ties
        # Gemma 3 normalises queries and keys (RMSNorm scale 1 + weight), so sharpen attention there:
        # x4; with it a causal prefill changes about 20 of the 30 greedy tokens of an image prompt
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.fill_(3.0)
            layer.self_attn.k_norm.weight.fill_(3.0)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_gemma3(tmp_path_factory.mktemp("gemma3"))


def engine_for(path: Path, draft: str = "none", tree=TreeBudget(depth=4, branching=3, draft_nodes=8),
               **config) -> Engine:
    return Engine.from_config(EngineConfig(model=str(path), draft=draft, dtype="float64", batch_tree_tokens=0,
                                           tree=tree, **config))


def picture(size=(48, 40), color=(200, 30, 30)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((20, 40, 220), (0, 0, size[0] // 2, size[1] // 3))  # not uniform: patches differ
    return image


def image_prompt(engine: Engine, images=None, text="describe the red circle. a red circle, a blue"):
    parts = [{"type": "image", "image": image} for image in images or [picture()]]
    return engine.prepare_chat([{"role": "user", "content": [*parts, {"type": "text", "text": text}]}])


def two_image_prompt(engine: Engine):
    return image_prompt(engine, [picture(), picture((32, 64), (30, 200, 30))], "compare them. a red circle")


def text_prompt(engine: Engine):
    return engine.prepare_chat([{"role": "user", "content": "the quick brown fox. the quick brown"}])


def token_types(engine: Engine, prompt) -> torch.Tensor:
    """The processor's `token_type_ids` for the prompt: 1 at image tokens."""
    return (torch.tensor([prompt.token_ids]) == engine.target.adapter.image_token_id).long()


def reference_greedy(engine: Engine, prompt, max_new: int = MAX_NEW, bidirectional: bool = True) -> list[int]:
    """The model's own greedy decoding; `bidirectional` False leaves out `token_type_ids` (a causal prefill)."""
    ids = torch.tensor([prompt.token_ids])
    kwargs = {}
    if prompt.images is not None:
        kwargs = image_tensors(prompt.images, "cpu", torch.float64)
        if bidirectional:
            kwargs["token_type_ids"] = token_types(engine, prompt)
    out = engine.target.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def test_adapter_processor_and_blocks(model_dir):
    engine = engine_for(model_dir)
    target = engine.target
    assert isinstance(target.adapter, Gemma3Adapter)
    assert isinstance(engine.prompts.processor, Gemma3Processor)
    assert isinstance(engine.prompts.processor.image_processor, Gemma3ImageProcessorPil)  # no torchvision here
    assert set(target.config.layer_types) == {"sliding_attention", "full_attention"}
    assert target.max_context == 512  # not capped at the window (tests/server/test_sliding_window.py)
    # the decoder's input embeddings are the scaled ones: sqrt(hidden) x the table
    ids = torch.tensor([[5, 6]])
    assert torch.allclose(target.embed_tokens(ids), target.embed_tokens.weight[ids] * 64 ** 0.5)
    prompt = two_image_prompt(engine)
    assert prompt.num_images == 2 and list(prompt.images) == ["pixel_values"]
    types = token_types(engine, prompt)[0]
    assert int(types.sum()) == 2 * IMAGE_TOKENS
    blocks = target.embed(prompt).blocks
    assert blocks[types == 1].tolist() == [0] * IMAGE_TOKENS + [1] * IMAGE_TOKENS
    assert (blocks[types == 0] == -1).all()
    assert target.embed(text_prompt(engine)).blocks is None


def test_a_causal_prefill_differs_from_generate(model_dir, monkeypatch):
    """Without its blocks the engine prefills causally and no longer matches `generate` (it matches
    `generate` without `token_type_ids` instead), so the equality tests below can fail."""
    engine = engine_for(model_dir)
    monkeypatch.setattr(engine.target.adapter, "bidirectional_blocks", lambda token_ids: None)
    for prompt in (image_prompt(engine), two_image_prompt(engine)):
        causal = reference_greedy(engine, prompt, bidirectional=False)
        assert sum(a != b for a, b in zip(reference_greedy(engine, prompt), causal)) >= 10
        assert engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW)).token_ids == causal


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_greedy_matches_generate(model_dir, draft):
    engine = engine_for(model_dir, draft)
    accepted = 0
    for prompt in (image_prompt(engine), two_image_prompt(engine), text_prompt(engine)):
        out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW))
        assert out.token_ids == reference_greedy(engine, prompt)
        accepted += out.metrics.accepted_draft_tokens
    if draft == "ngram":
        assert accepted > 0  # trees were verified with the 4D mask over sliding and full layers


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_chunked_prefill_never_cuts_an_image(model_dir, draft):
    # 3-token chunks, smaller than an image's 4 tokens: a chunk that would end inside an image stops
    # before it, and the next one takes the whole image
    engine = engine_for(model_dir, draft, prefill_chunk_tokens=3)
    prompt = two_image_prompt(engine)
    blocks = engine.target.embed(prompt).blocks
    seq = engine.start(prompt, SamplingParams(max_tokens=MAX_NEW))
    ends, tokens = [0], []
    while not seq.finished:
        out = engine.step_batch([seq])[0]
        assert not isinstance(out, Exception), out
        if out is None:
            ends.append(seq.prefix_len)
        tokens += out.token_ids if out is not None else []
    engine.release(seq)
    ends.append(len(prompt.token_ids))
    chunks = [(a, b) for a, b in zip(ends, ends[1:])]
    assert all(0 < b - a <= 3 or blocks[a:b].tolist() == [blocks[a].item()] * IMAGE_TOKENS for a, b in chunks)
    assert sum(b - a == IMAGE_TOKENS for a, b in chunks) == 2  # each image in a chunk of its own
    for end in ends[1:-1]:  # no chunk boundary inside an image
        assert blocks[end] < 0 or blocks[end - 1] != blocks[end]
    assert tokens == reference_greedy(engine, prompt)


def test_greedy_batch_of_image_and_text_prompts(model_dir):
    engine = engine_for(model_dir, "ngram")
    prompts = [image_prompt(engine), two_image_prompt(engine), text_prompt(engine)]
    params = SamplingParams(max_tokens=MAX_NEW)
    arrivals = [(0, prompts[0], params), (0, prompts[1], params), (2, prompts[2], params)]
    tokens, largest, _ = run_batched(engine, arrivals)
    assert largest == 3
    for i, prompt in enumerate(prompts):
        assert tokens[i] == reference_greedy(engine, prompt), i


def test_greedy_batch_sharing_prefill_chunks(model_dir):
    """Two image prompts take 6 prompt tokens per turn between them (a chunk that starts an image may
    overdraw the turn) while a text prompt decodes beside them; each output equals its `generate`."""
    engine = engine_for(model_dir, "ngram", prefill_chunk_tokens=6)
    prompts = [text_prompt(engine), image_prompt(engine), two_image_prompt(engine)]
    seqs = [engine.start(prompt, SamplingParams(max_tokens=MAX_NEW)) for prompt in prompts]
    tokens = [[] for _ in seqs]
    for _ in range(200):
        live = [i for i, seq in enumerate(seqs) if not seq.finished]
        if not live:
            break
        for i, out in zip(live, engine.step_batch([seqs[i] for i in live])):
            assert not isinstance(out, Exception), out
            tokens[i] += out.token_ids if out is not None else []
    for i, prompt in enumerate(prompts):
        assert tokens[i] == reference_greedy(engine, prompt), i


def test_greedy_multi_turn_with_an_image(model_dir):
    """The image (seen bidirectionally) sits turns before the generation prompt: output == generate."""
    check_multi_turn(engine_for(model_dir, "ngram"), picture(), reference_greedy)


@pytest.mark.parametrize("padding", [0, 60])
def test_greedy_with_a_draft_lm(model_dir, draft_lm_dir, padding):
    """A separate text draft LM with Gemma 3's tokenizer (its image delimiters included), its vocabulary
    exactly the target's or padded with rows that are no tokens, drafts after images: output == generate."""
    engine = engine_for(model_dir, str(draft_lm_dir(model_dir, padding)))
    check_draft_lm(engine, [image_prompt(engine), two_image_prompt(engine), text_prompt(engine)], reference_greedy)


def test_a_padded_draft_lm_samples_a_chain(model_dir, draft_lm_dir):
    """A chain sampled from a padded draft LM's q (cut to the target's width, so min(1, p/q) compares
    the same tokens) after an image: seeded runs repeat and draft on the way."""
    tree = TreeBudget(depth=3, branching=1, draft_nodes=3, mode=TreeMode.CHAIN)
    engine = engine_for(model_dir, str(draft_lm_dir(model_dir, 60)), tree=tree)
    prompt, params = image_prompt(engine), SamplingParams(max_tokens=MAX_NEW, temperature=0.7, seed=3)
    first = engine.generate(prompt, params)
    assert first.metrics.proposed_draft_tokens > 0
    assert engine.generate(prompt, params).token_ids == first.token_ids


def test_a_draft_lm_without_the_image_tokens_is_refused(model_dir, tmp_path):
    """A draft LM on the tokenizer without Gemma 3's image delimiters cannot read the prompt: refused at
    load, not at the first image request."""
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        engine_for(model_dir, str(make_tiny_model("qwen2", tmp_path)))


@pytest.mark.parametrize("mode", list(ImageMode))
def test_greedy_with_a_random_eagle_head(model_dir, random_head_dir, mode):
    """An EAGLE/MSD head (random weights; one Gemma 3 layer: q/k norms, scaled embeddings) in every image
    mode drafts after images, alone and in a batch with a text prompt; output == generate."""
    engine = engine_for(model_dir, str(random_head_dir(model_dir, mode)))
    assert engine.proposer.head.layers[0].self_attn.sliding_window is None  # its masks hold every entry
    prompts = [two_image_prompt(engine), text_prompt(engine)]
    check_eagle_batch(engine, prompts, reference_greedy)
