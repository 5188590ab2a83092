"""EAGLE/MSD heads for an M-RoPE target (a tiny random Qwen2.5-VL): the self-distillation answers and the
teacher pass follow the model's own M-RoPE positions; `train-draft` with image prompts trains a head (in
each decoupled mode) that drafts losslessly with an image and is accepted far more than a random one;
a head in MSD's published Qwen2-VL layout loads as `--draft`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from specserve.drafting.eagle import EagleProposer
from specserve.drafting.eagle_head import HeadConfig, ImageMode, is_eagle_folder, new_head, save_head
from specserve.server.engine import Engine
from specserve.server.engine.config import SamplingParams
from specserve.server.engine.outputs import image_tensors
from specserve.server.training.draft_head.cli import add_train_parser
from specserve.server.training.draft_head.data import Example, chat_prompt, generate_examples
from specserve.server.training.draft_head.distill import teacher_pass
from specserve.server.training.draft_head.prompts import PromptSpec

from ..server.test_qwen2_vl import engine_for, image_prompt, make_tiny_qwen_vl, reference_greedy

ANSWER = 24  # answer tokens per training example


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen_vl("qwen2_5_vl", tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def base(target_dir) -> Engine:
    return engine_for(target_dir)  # float64, no drafter


def own_forward(engine: Engine, example: Example) -> torch.Tensor:
    """The model's own final-norm hidden states [L, H] for an example (M-RoPE from its token types)."""
    ids = torch.tensor([example.token_ids])
    kwargs = {}
    if example.images:
        kwargs = image_tensors(example.images, "cpu", torch.float64) | {
            "mm_token_type_ids": (ids == engine.target.adapter.image_token_id).long()}
    with torch.no_grad():
        return engine.target.model.model(input_ids=ids, use_cache=False, **kwargs).last_hidden_state[0]


def test_teacher_pass_runs_the_target_at_its_m_rope_positions(base):
    """Right-padded rows of a text prompt and a shorter image prompt (+ its answer): each row's hidden
    states equal the model's own forward; at plain positions the image row's would not."""
    text = base.prepare_chat([{"role": "user", "content": "the quick brown fox jumps over the lazy dog. " * 3}])
    image = image_prompt(base, text="red")
    examples = [
        Example(PromptSpec("t"), text.token_ids, len(text.token_ids) - 1, None),
        Example(PromptSpec("i", "x.png"), image.token_ids + reference_greedy(base, image, 6), len(image.token_ids),
                image.images),
    ]
    assert len(examples[1].token_ids) < len(examples[0].token_ids)  # the image row is padded
    teacher = teacher_pass(base.target, examples)
    for row, example in enumerate(examples):
        torch.testing.assert_close(teacher.hidden[row, : teacher.lengths[row]], own_forward(base, example))
    length = teacher.lengths[1]
    with torch.no_grad():
        plain = base.target.adapter.decoder(inputs_embeds=teacher.inputs_embeds[1:, :length], use_cache=False)
    assert not torch.allclose(plain.last_hidden_state[0], teacher.hidden[1, :length], atol=1e-3)
    placeholder = base.target.adapter.image_token_id  # an answer token equal to it is text, not an image
    odd = Example(PromptSpec("i", "x.png"), image.token_ids + [placeholder], len(image.token_ids), image.images)
    mask = teacher_pass(base.target, [odd]).image_mask[0].tolist()
    assert mask == [token == placeholder for token in image.token_ids] + [False]


def test_self_distillation_answers_are_the_targets_greedy_answers(base, tmp_path):
    """The batched, left-padded answers of `generate_examples` (an image prompt beside a text prompt)
    equal the target's own greedy answers, which need its M-RoPE positions."""
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    image.paste((20, 40, 220), (0, 0, 24, 13))
    image.save(tmp_path / "image.png")
    specs = [PromptSpec("describe the red circle. a red circle", str(tmp_path / "image.png")),
             PromptSpec("the quick brown fox. the quick brown")]
    examples = generate_examples(base, specs, 12, batch_size=2, desc="answers")
    for spec, example in zip(specs, examples):
        assert example.token_ids[example.answer_start :] == reference_greedy(base, chat_prompt(base, spec), 12)


@pytest.fixture(scope="module", params=[ImageMode.DECOUPLED, ImageMode.DECOUPLED_POOLED])
def trained_run(request, target_dir, tmp_path_factory) -> tuple[ImageMode, Path]:
    """`train-draft` on the tiny target: 4 text + 4 easy-vqa image prompts, 30 steps (4 text-only)."""
    out = tmp_path_factory.mktemp(f"run-{request.param.value}")
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    args = parser.parse_args([
        "train-draft", "--model", str(target_dir), "--out", str(out), "--dtype", "float32",
        "--image-mode", request.param.value, "--text-examples", "4", "--image-examples", "4", "--eval-text", "1",
        "--eval-images", "1", "--max-new-tokens", str(ANSWER), "--text-steps", "4", "--mm-steps", "26",
        "--batch-size", "4", "--warmup", "1", "--lr", "3e-3", "--draft-vocab", "0"])
    with contextlib.redirect_stdout(io.StringIO()):  # the evaluation summary
        assert args.run(args) == 0
    return request.param, out


def accepted_on_training_images(base: Engine, folder: Path, rows: list[dict]) -> int:
    """Draft tokens accepted when `folder` drafts the answers to training image prompts; checks that
    the greedy output equals the target's own on the way."""
    engine = Engine(replace(base.config, draft=str(folder)), base.target, base.tokenizer, base.prompts.processor)
    assert isinstance(engine.proposer, EagleProposer)
    accepted = 0
    for row in rows:
        prompt = chat_prompt(engine, PromptSpec(row["text"], row["image"]))
        out = engine.generate(prompt, SamplingParams(max_tokens=ANSWER))
        assert out.token_ids == reference_greedy(engine, prompt, ANSWER)
        accepted += out.metrics.accepted_draft_tokens
    return accepted


def test_trained_head_drafts_losslessly_and_beats_a_random_one(base, trained_run, tmp_path):
    mode, out = trained_run
    summary = json.loads((out / "eval.json").read_text())
    assert len(summary["heldout_top1_images"]) == 3  # per tree depth
    rows = json.loads((out / "data-train-images.json").read_text())[:2]
    assert all(row["image"] for row in rows)
    save_head(new_head(base.target.config, HeadConfig(image_mode=mode)), tmp_path / "random")
    trained = accepted_on_training_images(base, out / "head", rows)
    random = accepted_on_training_images(base, tmp_path / "random", rows)
    assert trained >= 8 and trained > 2 * random, (trained, random)


def write_msd_qwen2_vl_layout(folder: Path, text_config, intermediate: int = 96) -> dict[str, torch.Tensor]:
    """A head as MSD publishes it for Qwen2-VL: a flat Qwen2-VL config (one layer, mrope rope_scaling,
    the vision tower's settings) and a pickled bf16 state dict with a biased fc, layer 0 with its
    input norm and biased q/k/v projections, and the embedding. Returns the state dict."""
    h, heads, kv_heads = text_config.hidden_size, text_config.num_attention_heads, text_config.num_key_value_heads
    kv = kv_heads * (h // heads)
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": h,
        "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": text_config.vocab_size, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "vision_config": {"depth": 2, "embed_dim": 32, "patch_size": 8},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {
        "fc.weight": (h, 2 * h), "fc.bias": (h,), "embed_tokens.weight": (text_config.vocab_size, h),
        "layers.0.self_attn.q_proj.weight": (h, h), "layers.0.self_attn.q_proj.bias": (h,),
        "layers.0.self_attn.k_proj.weight": (kv, h), "layers.0.self_attn.k_proj.bias": (kv,),
        "layers.0.self_attn.v_proj.weight": (kv, h), "layers.0.self_attn.v_proj.bias": (kv,),
        "layers.0.self_attn.o_proj.weight": (h, h), "layers.0.mlp.gate_proj.weight": (intermediate, h),
        "layers.0.mlp.up_proj.weight": (intermediate, h), "layers.0.mlp.down_proj.weight": (h, intermediate),
        "layers.0.input_layernorm.weight": (h,), "layers.0.post_attention_layernorm.weight": (h,),
    }
    gen = torch.Generator().manual_seed(0)
    state = {key: (torch.randn(shape, generator=gen) * 0.1).to(torch.bfloat16) for key, shape in shapes.items()}
    torch.save(state, folder / "pytorch_model.bin")
    return state


def test_msd_qwen2_vl_head_layout_loads_as_draft(base, target_dir, tmp_path):
    state = write_msd_qwen2_vl_layout(tmp_path / "msd-qwen2vl", base.target.config)
    assert is_eagle_folder(tmp_path / "msd-qwen2vl")
    engine = engine_for(target_dir, str(tmp_path / "msd-qwen2vl"))
    head = engine.proposer.head
    assert head.settings == HeadConfig(ImageMode.DECOUPLED, input_norm=True, fc_bias=True)
    assert head.layer_config.intermediate_size == 96 and head.fc.weight.dtype == torch.float64
    torch.testing.assert_close(head.layers[0].self_attn.k_proj.bias, state["layers.0.self_attn.k_proj.bias"].double())
    torch.testing.assert_close(head.layers[0].input_layernorm.weight, state["layers.0.input_layernorm.weight"].double())
    prompt = image_prompt(engine)
    out = engine.generate(prompt, SamplingParams(max_tokens=20))
    assert out.token_ids == reference_greedy(engine, prompt, 20)
    assert out.metrics.proposed_draft_tokens > 0
