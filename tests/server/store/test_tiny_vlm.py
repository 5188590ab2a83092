"""tiny-vlm: labels and texts from easy-vqa, and the assembled model answering easy-vqa test questions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from specserve.server.store.tiny_vlm.assemble import assemble
from specserve.server.store.tiny_vlm.model import (
    NUM_IMAGE_TOKENS,
    build_model,
    build_processor,
)
from specserve.server.training.tiny_vlm.data import COLORS, SHAPES, load_split
from specserve.server.training.tiny_vlm.evaluate import generate, names_right
from specserve.server.training.tiny_vlm.texts import (
    DESCRIBE_PROMPTS,
    DESCRIPTIONS,
    Sample,
    description,
    qa_samples,
)
from specserve.server.training.tiny_vlm.train import WordAlignment, pixel_values, repeat_matches


@pytest.fixture(scope="module")
def test_split():
    return load_split("test")


@pytest.fixture(scope="module")
def tiny_vlm(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The assembled folder, loaded the way users load it (offline, auto classes)."""
    dest = tmp_path_factory.mktemp("tiny-vlm")
    assemble(dest, smollm2_dir)
    torch.set_num_threads(2)
    return AutoModelForImageTextToText.from_pretrained(dest).eval(), AutoProcessor.from_pretrained(dest)


def test_labels_agree_with_every_wh_answer(test_split):
    for record in test_split:
        for question, answer in record.questions:
            if answer in SHAPES:
                assert answer == record.shape, (record.path, question)
            if answer in COLORS:
                assert answer == record.color, (record.path, question)


def test_descriptions_are_long_and_name_the_labels(test_split):
    record = test_split[0]
    for seed in range(2 * len(DESCRIPTIONS)):
        text = description(record, random.Random(seed))
        assert 3 <= text.count(". ") + 1 <= 5
        assert names_right(text, record)
    other = next(c for c in COLORS if c != record.color)
    assert not names_right(f"A {record.color} {record.shape} next to a {other} one.", record)


def test_processor_expands_the_image_placeholder(tiny_vlm, test_split):
    model, processor = tiny_vlm
    parts = [{"type": "image"}, {"type": "text", "text": "what shape is present?"}]
    messages = [{"role": "user", "content": parts}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<image>what shape is present?" in text and text.endswith("<|im_start|>assistant\n")
    inputs = processor(images=Image.open(test_split[0].path), text=text, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == NUM_IMAGE_TOKENS
    embed = model.get_input_embeddings().weight
    assert embed.shape[0] == model.config.image_token_index + 1
    torch.testing.assert_close(embed[-1], embed[:-1].mean(0))  # the documented `<image>` row


def test_answers_easy_vqa_test_questions(tiny_vlm, test_split):
    model, processor = tiny_vlm
    questions = random.Random(0).sample(qa_samples(test_split), 8)
    answers = generate(model, processor, test_split, questions, max_new_tokens=4, batch=8)
    texts = [processor.tokenizer.decode(a, skip_special_tokens=True).strip().lower() for a in answers]
    correct = sum(t == q.target for t, q in zip(texts, questions))
    assert correct >= 7, list(zip(texts, [q.target for q in questions]))


def test_description_names_shape_and_colour(tiny_vlm, test_split):
    model, processor = tiny_vlm
    prompt = [Sample(1, DESCRIBE_PROMPTS[0], "", "describe")]
    (tokens,) = generate(model, processor, test_split, prompt, max_new_tokens=160, batch=1)
    text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    assert names_right(text, test_split[1]), text
    assert len(tokens) >= 40 and model.config.image_token_index not in tokens


def test_word_alignment_puts_the_label_words_into_the_image_tokens(smollm2_dir, test_split):
    """Stage 2's auxiliary loss: trained alone on a few images, their mean projected tokens end up
    closest to the embeddings of their own colour and shape words."""
    processor = build_processor(smollm2_dir)
    records = test_split[:24]
    pixels = pixel_values(processor, records)
    torch.manual_seed(0)
    model = build_model(smollm2_dir, processor.image_token_id)
    align = WordAlignment(model, processor.tokenizer, records)
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    images = list(range(len(records)))
    first = align(model, pixels, images).item()
    for _ in range(100):
        loss = align(model, pixels, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10
    colour, shape = align.scores(model, pixels)
    assert [COLORS[i] for i in colour.argmax(-1)] == [r.color for r in records]
    assert [SHAPES[i] for i in shape.argmax(-1)] == [r.shape for r in records]


def test_repeat_matches_repeats_only_yes_no_questions_about_the_images_own_labels(test_split):
    record = test_split[0]
    other = next(c for c in COLORS if c != record.color)
    qa = [
        Sample(0, f"is there a {record.color} shape?", "yes", "qa"),
        Sample(0, f"is there not a {record.shape}?", "no", "qa"),
        Sample(0, f"is there a {other} shape?", "no", "qa"),
        Sample(0, "what color is the shape?", record.color, "qa"),
    ]
    repeated = repeat_matches(qa, test_split, 3)
    assert [repeated.count(s) for s in qa] == [3, 3, 1, 1]
    assert repeat_matches(qa, test_split, 1) == qa
