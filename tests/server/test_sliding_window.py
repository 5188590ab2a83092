"""Sliding-window targets past their window: greedy speculative output equals the model's own
`generate(do_sample=False)` when prompt and output run far beyond the window (16 tokens here), with
the sliding layers seeing only their window in prefill chunks and in tree verification, alone and in
a batch. Tiny random float64 models of two layouts: Mistral (every layer slides, one mask), Qwen2
with `use_sliding_window`, Gemma 2 and Gemma 3 (sliding and full layers, a mask per layer type), and a Gemma 3
vision-language model whose images are seen bidirectionally even where an image is wider than the
window. The checks can fail: the same engine with full-attention masks reproduces the model without
its window instead, which differs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

from specserve.drafting.budget import TreeBudget
from specserve.kernels.blocks import prefill_mask
from specserve.kernels.tree import DraftTree, LayerMasks, chain_tree
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.outputs import image_tensors

from ..conftest import build_tokenizer
from .test_gemma3 import image_prompt, make_tiny_gemma3, token_types, two_image_prompt

WINDOW = 16
MAX_NEW = 48
LONG = ("the quick brown fox jumps over the lazy dog. a red circle, a blue square and a green triangle. "
        "the cat sat on the mat")
SHORT = "def add(a, b):"
REPEAT = "a red circle, a blue square. a red circle, a blue"  # every family's output repeats itself here
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=WINDOW,
              tie_word_embeddings=False)
FAMILIES = {
    "mistral": lambda: MistralConfig(**COMMON),  # no layer_types: every layer slides
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=True, max_window_layers=1),  # layer 1 slides
    "gemma2": lambda: Gemma2Config(**COMMON, query_pre_attn_scalar=16),  # alternating, soft-capped attention
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, query_pre_attn_scalar=16,
                                            layer_types=["sliding_attention", "full_attention"]),
}


def make_tiny(family: str, path: Path) -> Path:
    tokenizer = build_tokenizer(path)
    eos = tokenizer.eos_token_id
    config = FAMILIES[family]()
    config.update(dict(vocab_size=len(tokenizer), eos_token_id=eos, bos_token_id=eos, pad_token_id=eos))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # random logits are nearly flat: sharpen them away from float ties
        for layer in model.model.layers:  # sharpen attention, so which keys a query sees matters
            attention = layer.self_attn
            if hasattr(attention, "q_norm"):  # Gemma 3 normalises queries and keys: scale the norms
                attention.q_norm.weight.fill_(3.0)
                attention.k_norm.weight.fill_(3.0)
            else:
                attention.q_proj.weight.mul_(10)
                attention.k_proj.weight.mul_(10)
    model.generation_config.eos_token_id = None  # run every sequence to MAX_NEW, far past the window
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sliding")
    return {family: make_tiny(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory) -> Path:
    # window 3: shorter than an image (4 tokens), which is still seen whole in prefill
    return make_tiny_gemma3(tmp_path_factory.mktemp("gemma3-window"), window=3)


def engine_for(path: Path, draft: str = "none", **config) -> Engine:
    return Engine.from_config(EngineConfig(model=str(path), draft=draft, dtype="float64", batch_tree_tokens=0,
                                           tree=TreeBudget(depth=4, branching=3, draft_nodes=8), **config))


def reference_greedy(model, prompt, max_new: int = MAX_NEW, **kwargs) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new, min_new_tokens=max_new, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def without_window(model):
    """The same weights in a model whose layers all attend to every key."""
    config = copy.deepcopy(model.config)
    if getattr(config, "layer_types", None):
        config.layer_types = ["full_attention"] * len(config.layer_types)
    else:
        config.sliding_window = None
    full = type(model)(config).to(torch.float64).eval()
    full.load_state_dict(model.state_dict())
    return full


def prompts(engine: Engine):
    return [engine.prepare_text(text) for text in (LONG, SHORT, REPEAT)]


def run_together(engine: Engine, arrivals: list[tuple[int, object]]) -> tuple[list[list[int]], int]:
    """Step every live sequence together each turn (prefill chunks included); request i joins at
    turn arrivals[i][0]. Returns each request's tokens and the largest batch seen."""
    params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    seqs, tokens, largest = {}, [[] for _ in arrivals], 0
    for turn in range(300):
        for i, (join, prompt) in enumerate(arrivals):
            if join == turn:
                seqs[i] = engine.start(prompt, params)
        live = [i for i, seq in seqs.items() if not seq.finished]
        if not live and turn > max(join for join, _ in arrivals):
            return tokens, largest
        largest = max(largest, len(live))
        for i, out in zip(live, engine.step_batch([seqs[i] for i in live])):
            assert not isinstance(out, Exception), out
            tokens[i] += out.token_ids if out is not None else []  # None: a prefill chunk
    raise AssertionError("the batch did not finish")


def allowed(mask: torch.Tensor) -> list[list[int]]:
    return (mask[0, 0] == 0).int().tolist()


def test_tree_mask_with_a_window():
    """`DraftTree.attention_mask`'s docstring example: window 2 counts the prefix by index and the
    tree by depth (nodes 1 and 2 sit at the same place, 3)."""
    tree = DraftTree.from_parents(torch.tensor([[5, 6, 7]]), torch.tensor([[-1, 0, 0]]))
    assert allowed(tree.attention_mask(2, torch.float32, 6, window=2)) == [
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 0, 1, 0],
    ]
    # a chain deeper than the window: each node sees itself and its parent only
    assert allowed(chain_tree(torch.tensor([[1, 2, 3, 4]])).attention_mask(1, torch.float32, window=2)) == [
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def test_prefill_mask_with_a_window():
    """`kernels.blocks`' example with window 2: the window cuts into the block too (Gemma 3's sliding
    layers: window AND (causal OR block)), but a block's later tokens stay visible."""
    assert allowed(prefill_mask(torch.tensor([0, 0, 0, -1, -1]), 2, torch.float32, window=2)) == [
        [0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ]


@pytest.mark.parametrize("config, expected", [
    (MistralConfig(sliding_window=16), LayerMasks(16)),  # every layer slides: one windowed mask
    (Gemma3TextConfig(sliding_window=16), LayerMasks(16, ("full_attention", "sliding_attention"))),
    (Qwen2Config(use_sliding_window=True, sliding_window=16, num_hidden_layers=2, max_window_layers=1),
     LayerMasks(16, ("full_attention", "sliding_attention"))),
    (Qwen2Config(sliding_window=16), LayerMasks()),  # use_sliding_window off: no layer slides
    (Qwen2Config(use_sliding_window=True, num_hidden_layers=2, max_window_layers=2), LayerMasks()),
    (MistralConfig(sliding_window=None), LayerMasks()),
])
def test_layer_masks_of_config(config, expected):
    masks = LayerMasks.of(config)
    assert masks == expected
    built = masks(lambda window: window)  # which window each layer type's mask gets
    assert built == ({kind: 16 if kind == "sliding_attention" else None for kind in expected.layer_types}
                     if expected.layer_types else expected.window)


@pytest.mark.parametrize("family, attention", [
    (family, attention) for family in FAMILIES for attention in ("eager", "sdpa")
    if (family, attention) != ("gemma2", "sdpa")  # transformers runs Gemma 2 eager only
])
def test_generate_itself_respects_the_window(model_dirs, family, attention):
    """The reference: the model's own generate, with either attention, sees only the window in its
    sliding layers, so past the window it differs from the same weights without one."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs[family], dtype=torch.float64,
                                                 attn_implementation=attention).eval()
    engine = engine_for(model_dirs[family])
    prompt = engine.prepare_text(LONG)
    assert len(prompt.token_ids) > WINDOW
    windowed = reference_greedy(model, prompt)
    assert windowed == reference_greedy(engine.target.model, prompt)  # eager and sdpa agree
    assert sum(a != b for a, b in zip(windowed, reference_greedy(without_window(model), prompt))) >= 5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_greedy_past_the_window_matches_generate(model_dirs, family, draft):
    engine = engine_for(model_dirs[family], draft)
    assert engine.target.max_context == 512  # no longer capped at the window
    assert engine.target.layer_masks.window == WINDOW
    accepted = 0
    for prompt in prompts(engine):
        out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))
        assert len(prompt.token_ids) + len(out.token_ids) > 3 * WINDOW
        assert out.token_ids == reference_greedy(engine.target.model, prompt)
        accepted += out.metrics.accepted_draft_tokens
    if draft == "ngram":
        assert accepted > 0  # trees were verified past the window


@pytest.mark.parametrize("family", FAMILIES)
def test_full_attention_masks_differ(model_dirs, family, monkeypatch):
    """With verification's masks unlimited (prefill chunks still get the decoder's own sliding masks)
    the engine no longer reproduces the model: the test above can fail."""
    engine = engine_for(model_dirs[family], "ngram", prefill_chunk_tokens=5)
    monkeypatch.setattr(type(engine.target), "layer_masks", LayerMasks())
    prompt = engine.prepare_text(LONG)
    out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)).token_ids
    assert sum(a != b for a, b in zip(out, reference_greedy(engine.target.model, prompt))) >= 5


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_batch_past_the_window(model_dirs, family):
    """5-token chunks (each chunk's sliding layers see the window reaching back into earlier chunks),
    then a batch of rows at different lengths, both past the window."""
    engine = engine_for(model_dirs[family], "ngram", prefill_chunk_tokens=5)
    long, short, repeat = prompts(engine)
    tokens, largest = run_together(engine, [(0, long), (3, short), (7, repeat)])
    assert largest == 3
    for i, prompt in enumerate((long, short, repeat)):
        assert tokens[i] == reference_greedy(engine.target.model, prompt), i


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_gemma3_images_past_a_window_narrower_than_an_image(gemma3_dir, draft):
    """Window 3, images of 4 tokens: each image is seen whole (its block) in the sliding layers'
    prefill mask, everything else through the window; chunked prefill and a batch with text."""
    engine = engine_for(gemma3_dir, draft, prefill_chunk_tokens=3)
    assert engine.target.layer_masks == LayerMasks(3, ("full_attention", "sliding_attention"))
    model = engine.target.model
    image_prompts = [image_prompt(engine), two_image_prompt(engine)]
    text = engine.prepare_text(LONG)
    tokens, largest = run_together(engine, [(0, image_prompts[0]), (0, image_prompts[1]), (2, text)])
    assert largest == 3
    for i, prompt in enumerate(image_prompts):
        images = image_tensors(prompt.images, "cpu", torch.float64)
        expected = reference_greedy(model, prompt, token_type_ids=token_types(engine, prompt), **images)
        assert tokens[i] == expected, i
    assert tokens[2] == reference_greedy(model, text)
