"""Training of EAGLE/MSD heads: schedule, draft vocabulary, batches; a tiny end-to-end run with resume
(slow) and greedy losslessness of every image mode on tiny-vlm (slow)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from specserve.drafting.base import DraftContext
from specserve.drafting.batched import drive
from specserve.drafting.budget import TreeBudget
from specserve.drafting.dynamic_tree import Candidates
from specserve.drafting.eagle import EagleProposer
from specserve.drafting.eagle_head import HeadConfig, ImageMode, new_head, save_head
from specserve.kernels.sampling import LogitsParams
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.training.draft_head.cli import add_train_parser
from specserve.server.training.draft_head.data import Example, draft_vocabulary
from specserve.server.training.draft_head.distill import draft_batch, pass_mask, teacher_pass, unrolled_features
from specserve.server.training.draft_head.loop import Datasets, TrainConfig, pick_batch
from specserve.server.training.draft_head.prompts import PromptSpec

TRAINED_HEAD = Path(__file__).resolve().parents[2] / "server" / "store" / "assets" / "tiny-vlm-msd"


def example(ids: list[int], answer_start: int, image: bool = False) -> Example:
    return Example(PromptSpec("p", "x.png" if image else None), ids, answer_start, None)


def test_image_share_rises_in_stage_two_only():
    config = TrainConfig(model="m", out="o", text_steps=10, mm_steps=5, image_share_start=0.2)
    shares = [config.image_share(step) for step in range(15)]
    assert shares[:10] == [0.0] * 10
    assert shares[10] == pytest.approx(0.2) and shares[14] == pytest.approx(1.0)
    assert shares[10:] == sorted(shares[10:])


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    config = TrainConfig(model="m", out="o", text_steps=50, mm_steps=50, lr=1.0, warmup=10)
    assert config.learning_rate(0) == pytest.approx(0.1)
    assert config.learning_rate(9) == pytest.approx(1.0)
    assert config.learning_rate(99) == pytest.approx(0.1, abs=1e-3)


def test_draft_vocabulary_takes_the_most_frequent_answer_tokens():
    data = [example([1, 2, 9, 9, 8], 2), example([9, 9, 7, 8, 7, 5], 2)]  # answers 9 9 8 / 7 8 7 5
    assert draft_vocabulary(data, 2).tolist() == [7, 8]  # 8 and 9 twice, 7 twice: 7 and 8 win by id
    assert draft_vocabulary(data, 3).tolist() == [7, 8, 9]
    assert draft_vocabulary(data, 10).tolist() == [5, 7, 8, 9]  # prompt tokens 1, 2 never count


def test_batches_are_seeded_by_step_and_follow_the_share():
    text = [example([1, 2, 3], 1) for _ in range(5)]
    images = [example([4, 5, 6], 1, image=True) for _ in range(5)]
    data = Datasets(text, images, [], [])
    config = TrainConfig(model="m", out="o", text_steps=2, mm_steps=3, image_share_start=1.0, batch_size=6)
    assert all(e.images is None and e.spec.image is None for e in pick_batch(data, config, 1))
    assert all(e.spec.image is not None for e in pick_batch(data, config, 2))
    assert [id(e) for e in pick_batch(data, config, 3)] == [id(e) for e in pick_batch(data, config, 3)]


def test_pass_mask_rows_see_root_context_and_ancestors():
    allowed = pass_mask(4, 2, torch.device("cpu"))[0, 0] == 0  # [4, 12]: pass 0 | pass 1 | pass 2
    assert allowed[3].int().tolist() == [1, 1, 0, 0] + [0, 0, 1, 0] + [0, 0, 0, 1]  # root = entry 1
    assert allowed[1].int().tolist() == [0, 0, 0, 0] + [1, 0, 0, 0] + [0, 1, 0, 0]  # root = entry -1
    assert (pass_mask(3, 0, torch.device("cpu"))[0, 0] == 0).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_unrolled_passes_equal_the_sessions_tree_levels(tiny_model_dirs):
    """Pass k of training must compute exactly what the session computes for a depth-k tree node."""
    engine = Engine.from_config(EngineConfig(str(tiny_model_dirs["llama"]), dtype="float64"))
    head = new_head(engine.target.config, HeadConfig()).double()
    ids = engine.prepare_text("the quick brown fox jumps over the lazy dog").token_ids
    teacher = teacher_pass(engine.target, [example(ids, 0)])
    batch = draft_batch(head, engine.target.embed_tokens, teacher, [example(ids, 0)], 0.0, None)
    with torch.no_grad():
        passes = unrolled_features(head, batch, 3)  # rows = entries with sources 1..L-2
    p = 5  # the session's prompt is ids[:p]; its root is ids[p], drafted chain ids[p+1], ids[p+2]
    hidden = teacher.hidden[0]
    proposer = EagleProposer(head, engine.target.embed_tokens, engine.target.lm_head, None, TreeBudget())
    proposer.reserve(num_slots=1, capacity=32)
    session = proposer.open(DraftContext(ids[:p], LogitsParams(), None, hidden[:p],
                                         teacher.inputs_embeds[0, :p], teacher.image_mask[0, :p]))
    chain = Candidates(ids[p : p + 3], [-1, 0, 1], [0.0] * 3, [0, 1, 2])

    def catch_up_then_two_levels():
        yield from session._catch_up(ids[p])
        yield from session._run_level(chain, [1], 1)
        yield from session._run_level(chain, [2], 2)

    with torch.inference_mode():
        assert drive([session.slot], [catch_up_then_two_levels()], proposer.run) == [None]
    for depth in range(3):  # the node at depth d consumes ids[p + d]: the entry with source p + d
        torch.testing.assert_close(session.features[depth], passes[depth][p + depth - 1], rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_tiny_training_run_resumes_and_serves(tiny_model_dirs, tmp_path):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    out = tmp_path / "run"
    argv = ["train-draft", "--model", str(tiny_model_dirs["llava"]), "--out", str(out), "--dtype", "float32",
            "--text-examples", "4", "--image-examples", "4", "--eval-text", "2", "--eval-images", "2",
            "--max-new-tokens", "10", "--text-steps", "2", "--mm-steps", "2", "--batch-size", "2",
            "--checkpoint-every", "1", "--warmup", "1", "--draft-vocab", "64"]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    summary = json.loads((out / "eval.json").read_text())
    for name in ("heldout_top1_images", "heldout_top1_text"):
        assert len(summary[name]) == 3 and all(0.0 <= a <= 1.0 for a in summary[name])  # per tree depth
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    first = (out / "head" / "model.safetensors").read_bytes()
    args = parser.parse_args(argv)  # resume: the checkpoint is at the last step, nothing more to train
    assert args.run(args) == 0
    assert (out / "head" / "model.safetensors").read_bytes() == first
    engine = Engine.from_config(EngineConfig(str(tiny_model_dirs["llava"]), draft=str(out / "head")))
    assert isinstance(engine.proposer, EagleProposer) and len(engine.proposer.head.draft_vocab) <= 64
    out = engine.generate(engine.prepare_text("the quick brown fox"), SamplingParams(max_tokens=8))
    assert len(out.token_ids) > 0


def test_a_run_stopped_early_and_resumed_equals_an_uninterrupted_one(tiny_model_dirs, tmp_path):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())

    def run(out, *extra):
        argv = ["train-draft", "--model", str(tiny_model_dirs["llava"]), "--out", str(out), "--dtype",
                "float32", "--text-examples", "4", "--image-examples", "4", "--eval-text", "1",
                "--eval-images", "1", "--max-new-tokens", "6", "--text-steps", "2", "--mm-steps", "2",
                "--batch-size", "2", "--warmup", "1", "--draft-vocab", "64", *extra]
        args = parser.parse_args(argv)
        assert args.run(args) == 0
        return torch.load(out / "checkpoint.pt", weights_only=True)["step"]

    assert run(tmp_path / "split", "--stop-at", "3") == 3
    assert run(tmp_path / "split") == 4
    assert run(tmp_path / "whole") == 4
    heads = [(tmp_path / name / "head" / "model.safetensors").read_bytes() for name in ("split", "whole")]
    assert heads[0] == heads[1]


@pytest.fixture(scope="module")
def tiny_vlm_dir(store_cache):
    from specserve.server.store.pull import pull

    return pull("tiny-vlm", store_cache, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [*ImageMode, "trained"])
def test_tiny_vlm_greedy_lossless_in_every_mode(tiny_vlm_dir, tmp_path, mode):
    """Random heads (losslessness must not depend on head quality) and the committed trained head,
    float32, an easy-vqa-like image."""
    base = Engine.from_config(EngineConfig(str(tiny_vlm_dir), dtype="float32"))
    folder = TRAINED_HEAD if mode == "trained" else tmp_path
    if mode != "trained":
        save_head(new_head(base.target.config, HeadConfig(image_mode=mode)), folder)
    config = EngineConfig(str(tiny_vlm_dir), draft=str(folder), dtype="float32",
                          tree=TreeBudget(depth=5, branching=4, draft_nodes=16), batch_tree_tokens=0)
    engine = Engine(config, base.target, base.tokenizer, base.prompts.processor)
    image = Image.new("RGB", (64, 64), (250, 250, 240))
    image.paste((0, 0, 255), (10, 12, 40, 44))
    prompt = engine.prepare_chat([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]}])
    out = engine.generate(prompt, SamplingParams(max_tokens=48))
    ids = torch.tensor([prompt.token_ids])
    expected = base.target.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), **prompt.images,
        do_sample=False, max_new_tokens=48,
    )[0, ids.shape[1]:].tolist()
    assert out.token_ids == expected
    if mode == "trained":
        assert out.metrics.mean_accepted_length > 2.0  # the trained head must actually draft well
