"""EAGLE/MSD drafting in the engine: greedy output == the target's own `generate`, in float64, for a
text model and the tiny LLaVA with an image, in every image mode, with random heads (losslessness must
not depend on head quality); the catch-up alignment; seeded sampling."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from specserve.drafting.base import DraftContext
from specserve.drafting.budget import TreeBudget, TreeMode
from specserve.drafting.eagle import EagleProposer, EagleSession
from specserve.drafting.eagle_head import ImageMode
from specserve.drafting.eagle_inputs import prompt_entries
from specserve.kernels.sampling import LogitsParams
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.outputs import PromptInput, image_tensors

TEXT_PROMPTS = ["the quick brown fox", "Summarise: the cat sat on the mat. The mat was red."]
TREE = TreeBudget(depth=4, branching=3, draft_nodes=10)


def eagle_engine(model_dir, folder, tree: TreeBudget = TREE, **config) -> Engine:
    config = EngineConfig(model=str(model_dir), draft=str(folder), dtype="float64", tree=tree, **config)
    engine = Engine.from_config(config)
    assert isinstance(engine.proposer, EagleProposer)  # detected by its keys, not its name
    return engine


def image_prompt(engine: Engine, text: str = "describe the red circle"):
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    return engine.prepare_chat(messages)


def reference_greedy(engine: Engine, prompt, max_new: int) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    extra = image_tensors(prompt.images, "cpu", torch.float64)
    out = engine.target.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new, **extra
    )
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tree_mode", list(TreeMode))
def test_greedy_text_model(tiny_model_dirs, random_head_dir, family, tree_mode):
    model_dir = tiny_model_dirs[family]
    tree = TreeBudget(depth=4, branching=3, draft_nodes=10, mode=tree_mode, preset="small-8")
    engine = eagle_engine(model_dir, random_head_dir(model_dir, ImageMode.DECOUPLED), tree)
    for text in TEXT_PROMPTS:
        prompt = engine.prepare_text(text)
        assert engine.generate(prompt, SamplingParams(max_tokens=40)).token_ids == reference_greedy(
            engine, prompt, 40
        ), text


@pytest.mark.parametrize("mode", list(ImageMode))
def test_greedy_llava_with_image(tiny_model_dirs, random_head_dir, mode):
    model_dir = tiny_model_dirs["llava"]
    vocab = list(range(0, 380, 3)) if mode is ImageMode.DECOUPLED else None  # and a draft vocabulary
    engine = eagle_engine(model_dir, random_head_dir(model_dir, mode, vocab))
    prompt = image_prompt(engine)
    assert prompt.num_images == 1
    out = engine.generate(prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    assert out.token_ids == reference_greedy(engine, prompt, 30)
    assert out.metrics.verify_steps > 0


def test_a_prompt_prefilled_in_chunks_gives_the_head_the_same_features(tiny_model_dirs, random_head_dir):
    """Chunks of 5 tokens cut through the image's placeholder run; the head is opened once, on the
    hidden states of every chunk: same output and the same drafts accepted as one whole-prompt pass."""
    model_dir = tiny_model_dirs["llava"]
    folder = random_head_dir(model_dir, ImageMode.DECOUPLED)
    # batch_tree_tokens=0: every proposal verified whole (the default planner's cut depends on timing)
    whole, chunked = (eagle_engine(model_dir, folder, prefill_chunk_tokens=size, batch_tree_tokens=0)
                      for size in (None, 5))
    prompt = image_prompt(whole)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    a, b = whole.generate(prompt, params), chunked.generate(prompt, params)
    assert b.token_ids == a.token_ids == reference_greedy(whole, prompt, 30)
    assert b.metrics.to_dict() == a.metrics.to_dict()


@pytest.mark.parametrize("mode", [ImageMode.FUSED, ImageMode.DECOUPLED_POOLED])
def test_catch_up_matches_fresh_recomputation(tiny_model_dirs, random_head_dir, mode):
    """Open on a prompt, propose, commit root + two tokens with their target features, propose again:
    the head's cache must equal one causal pass of the head over the whole sequence, i.e. catch-up
    pairs each token with the feature one position before it, also across a multi-token commit."""
    model_dir = tiny_model_dirs["llava"]
    engine = eagle_engine(model_dir, random_head_dir(model_dir, mode))
    prompt = image_prompt(engine)
    root, a1, a2, bonus = 5, 17, 42, 9  # any tokens: the session must not care whether they were drafted
    full = PromptInput(prompt.token_ids + [root, a1, a2, bonus], prompt.images, 1)
    out = engine.target.embed(full)
    hidden = engine.target.prefill(out.embeds, engine.target.new_cache(1, len(full.token_ids)), 0, 0)[0]
    length = len(prompt.token_ids)
    session: EagleSession = engine.proposer.open(DraftContext(
        prompt.token_ids, LogitsParams(), None, hidden[:length], out.embeds[0, :length],
        out.image_mask[0, :length],
    ))
    session.propose(root)
    session.commit([root, a1, a2], hidden[length : length + 3])
    session.propose(bonus)
    head = engine.proposer.head
    with torch.inference_mode():
        entries = prompt_entries(head, engine.target.embed_tokens, torch.tensor(full.token_ids), hidden,
                                 out.embeds[0], out.image_mask[0])
        n = len(entries.inputs)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.zeros(n, n, dtype=torch.float64).masked_fill_(~causal, torch.finfo(torch.float64).min)
        cache = DynamicCache()
        head(entries.inputs[None], torch.arange(n)[None], mask[None, None], cache)
    assert session.length == n
    slot = engine.proposer.cache.layers[0]  # the session's committed rows of its slot
    torch.testing.assert_close(slot.keys[session.slot, :, :n], cache.layers[0].keys[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slot.values[session.slot, :, :n], cache.layers[0].values[0], rtol=1e-12, atol=1e-12)


def test_sampling_is_seeded_and_reproducible(tiny_model_dirs, random_head_dir):
    model_dir = tiny_model_dirs["llava"]
    engine = eagle_engine(model_dir, random_head_dir(model_dir, ImageMode.DECOUPLED))
    prompt = image_prompt(engine)
    runs = [
        engine.generate(prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=seed, ignore_eos=True))
        for seed in (7, 7, 8)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].token_ids != runs[2].token_ids  # a random model at T=1: 30 equal draws are unlikely
    assert all(len(run.token_ids) == 30 for run in runs)
