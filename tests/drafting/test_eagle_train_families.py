"""EAGLE/MSD training for families whose prefill is more than a causal forward: Qwen3-VL (deepstack
features inside the decoder's first layers) and Gemma 3 (each image seen both ways, sliding-window
layers). The teacher pass over a right-padded batch gives every row the hidden states the engine's own
prefill and decoding give it (and a plain forward would not); the batched self-distillation answers
are the target's greedy answers; `train-draft` trains a head that drafts losslessly with an image."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from specserve.drafting.eagle import EagleProposer
from specserve.kernels.tree import chain_tree
from specserve.server.engine import Engine
from specserve.server.engine.batch_inputs import batch_inputs
from specserve.server.engine.config import SamplingParams
from specserve.server.engine.outputs import PromptInput
from specserve.server.training.draft_head.cli import add_train_parser
from specserve.server.training.draft_head.data import Example, chat_prompt, generate_examples
from specserve.server.training.draft_head.distill import teacher_pass
from specserve.server.training.draft_head.prompts import PromptSpec

from ..server import test_gemma3, test_qwen2_vl

# per family: the tiny model, its float64 engine, an image prompt, the model's own greedy decoding,
# and the decoder inputs without which the engine's prefill would be a plain causal forward
FAMILIES = {
    "qwen3_vl": (lambda path: test_qwen2_vl.make_tiny_qwen_vl("qwen3_vl", path), test_qwen2_vl,
                 ("visual_pos_masks", "deepstack_visual_embeds")),
    # a sliding window of 3, shorter than an image (4 tokens): a sliding layer sees part of its block
    "gemma3": (lambda path: test_gemma3.make_tiny_gemma3(path, window=3), test_gemma3, ("attention_mask",)),
}
ANSWER = 8


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return {name: make(tmp_path_factory.mktemp(name)) for name, (make, _, _) in FAMILIES.items()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, model_dirs) -> tuple[str, Engine]:
    return request.param, FAMILIES[request.param][1].engine_for(model_dirs[request.param])


def engine_hidden(engine: Engine, example: Example) -> torch.Tensor:
    """[L, H]: the engine's prefill of the example's prompt, then its answer decoded after it (one
    chain verify: each answer token causally after the prompt and the answer before it)."""
    target = engine.target
    prompt = prompt_of(example)
    embeds = target.embed(prompt)
    size = len(prompt.token_ids)
    cache = target.new_cache(1, len(example.token_ids) + 8)
    prefilled = target.prefill(embeds.embeds, cache, 0, 0, embeds.chunk_inputs(0, size))[0]
    answer = torch.tensor([example.token_ids[size:]])
    decoded = target.verify(chain_tree(answer), cache, [0], [size], [embeds.rope_delta]).hidden[0]
    return torch.cat([prefilled, decoded])


def prompt_of(example: Example) -> PromptInput:
    return PromptInput(example.token_ids[: example.answer_start], example.images)


def padded_batch(engine: Engine, module) -> list[Example]:
    """An image prompt + its greedy answer, then a longer text prompt (+ 1 answer token): the image row
    is padded."""
    image = module.image_prompt(engine)
    text = engine.prepare_chat([{"role": "user", "content": "the quick brown fox jumps over the lazy dog. " * 6}])
    examples = [
        Example(PromptSpec("i", "x.png"), image.token_ids + module.reference_greedy(engine, image, ANSWER),
                len(image.token_ids), image.images),
        Example(PromptSpec("t"), text.token_ids, len(text.token_ids) - 1, None),
    ]
    assert len(examples[0].token_ids) < len(examples[1].token_ids)
    return examples


def test_teacher_pass_equals_the_engines_prefill_and_decoding(family):
    name, engine = family
    module, family_inputs = FAMILIES[name][1], FAMILIES[name][2]
    examples = padded_batch(engine, module)
    teacher = teacher_pass(engine.target, examples)
    for row, example in enumerate(examples):
        torch.testing.assert_close(teacher.hidden[row, : teacher.lengths[row]], engine_hidden(engine, example))
    assert teacher.image_mask[0].sum() > 0 and not teacher.image_mask[1].any()
    # without the family's own prefill inputs the image row's prompt and answer come out otherwise
    prompts = [engine.target.embed(prompt_of(e)) for e in examples]
    inputs = batch_inputs(prompts, teacher.lengths)
    assert set(family_inputs) <= set(inputs)
    plain = {key: value for key, value in inputs.items() if key not in family_inputs}
    with torch.no_grad():
        hidden = engine.target.adapter.decoder(inputs_embeds=teacher.inputs_embeds, use_cache=False,
                                               **plain).last_hidden_state
    image_row, start = teacher.lengths[0], examples[0].answer_start
    assert not torch.allclose(hidden[0, :start], teacher.hidden[0, :start], atol=1e-3)
    assert not torch.allclose(hidden[0, start:image_row], teacher.hidden[0, start:image_row], atol=1e-3)
    torch.testing.assert_close(hidden[1, : teacher.lengths[1]], teacher.hidden[1, : teacher.lengths[1]])


def test_self_distillation_answers_are_the_targets_greedy_answers(family, tmp_path):
    """Left-padded batched answers (an image prompt beside a longer text prompt) equal each prompt's
    own greedy decoding."""
    name, engine = family
    module = FAMILIES[name][1]
    picture = test_gemma3.picture()
    picture.save(tmp_path / "image.png")
    specs = [PromptSpec("describe the red circle. a red circle", str(tmp_path / "image.png")),
             PromptSpec("the quick brown fox jumps over the lazy dog. " * 3)]
    prompts = [chat_prompt(engine, spec) for spec in specs]
    assert len(prompts[0].token_ids) < len(prompts[1].token_ids)  # the image row is left-padded
    examples = generate_examples(engine, specs, 12, batch_size=2, desc="answers")
    for prompt, example in zip(prompts, examples):
        assert example.token_ids[example.answer_start :] == module.reference_greedy(engine, prompt, 12)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trained_head_drafts_losslessly_with_an_image(model_dirs, name, tmp_path):
    """A short `train-draft` run (easy-vqa images); its head loads as `--draft` and greedy output with an
    image equals the model's own."""
    path, module = model_dirs[name], FAMILIES[name][1]
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    args = parser.parse_args([
        "train-draft", "--model", str(path), "--out", str(tmp_path), "--dtype", "float32",
        "--text-examples", "2", "--image-examples", "2", "--eval-text", "1", "--eval-images", "1",
        "--max-new-tokens", "12", "--text-steps", "2", "--mm-steps", "4", "--batch-size", "2", "--warmup", "1",
        "--draft-vocab", "0"])
    with contextlib.redirect_stdout(io.StringIO()):  # the evaluation summary
        assert args.run(args) == 0
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert len(summary["heldout_top1_images"]) == 3  # per tree depth
    engine = module.engine_for(path, str(tmp_path / "head"))
    assert isinstance(engine.proposer, EagleProposer)
    prompt = module.image_prompt(engine)
    out = engine.generate(prompt, SamplingParams(max_tokens=20))
    assert out.token_ids == module.reference_greedy(engine, prompt, 20)
    assert out.metrics.proposed_draft_tokens > 0
