"""Checks that the vision-language family tests (test_qwen2_vl, test_llava_next, test_idefics3,
test_gemma3) run alike. Each module passes its engine, its prompts and its `reference`: the model's own
greedy `generate` for a prompt, with whatever that family needs besides the images."""

from __future__ import annotations

from typing import Callable

from PIL import Image

from specserve.drafting.eagle import EagleProposer
from specserve.server.engine import Engine
from specserve.server.engine.config import SamplingParams
from specserve.server.engine.outputs import PromptInput

from .test_engine_batch import run_batched

MAX_NEW = 30
Reference = Callable[[Engine, PromptInput], list[int]]


def multi_turn_prompt(engine: Engine, image: Image.Image) -> PromptInput:
    """An image in the first user turn, the assistant's answer, then a second user turn of text."""
    return engine.prepare_chat([
        {"role": "user", "content": [{"type": "image", "image": image},
                                     {"type": "text", "text": "describe the red circle."}]},
        {"role": "assistant", "content": "a red circle, a blue square and a green triangle."},
        {"role": "user", "content": "the quick brown fox. the quick brown"},
    ])


def check_multi_turn(engine: Engine, image: Image.Image, reference: Reference) -> None:
    """The image sits turns before the generation prompt: output == reference."""
    prompt = multi_turn_prompt(engine, image)
    image_at = prompt.token_ids.index(engine.target.adapter.image_token_id)
    assert prompt.num_images == 1 and image_at < len(prompt.token_ids) // 2
    out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW))
    assert out.token_ids == reference(engine, prompt)


def check_draft_lm(engine: Engine, prompts: list[PromptInput], reference: Reference) -> None:
    """Each prompt alone: output == reference, and the draft LM drafted."""
    for prompt in prompts:
        out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW))
        assert out.token_ids == reference(engine, prompt)
        assert out.metrics.proposed_draft_tokens > 0


def check_eagle_batch(engine: Engine, prompts: list[PromptInput], reference: Reference) -> None:
    """An EAGLE/MSD head drafts for the prompts stepped as one batch: each output == reference."""
    assert isinstance(engine.proposer, EagleProposer)
    params = SamplingParams(max_tokens=MAX_NEW)
    tokens, largest, _ = run_batched(engine, [(0, prompt, params) for prompt in prompts])
    assert largest == len(prompts)
    for i, prompt in enumerate(prompts):
        assert tokens[i] == reference(engine, prompt), i
