"""Prompts and answer templates for captions and descriptions, filled in from an image's labels.

Descriptions are long on purpose (3-5 sentences, ~60-120 SmolLM2 tokens): speculative decoding pays
off on long outputs, and templated prose gives a drafter something to predict.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .data import PLACES, ImageRecord


@dataclass(frozen=True)
class Sample:
    """One training or evaluation turn: user text after the image, and the assistant's answer."""

    image: int  # index into the split's record list
    prompt: str
    target: str
    task: str  # "qa", "caption" or "describe"


CAPTION_PROMPTS = (
    "Write a caption for the image.",
    "Give a one-sentence caption of this picture.",
    "Caption this image.",
)
DESCRIBE_PROMPTS = (
    "Describe the image.",
    "Describe this image in detail.",
    "What do you see in this picture?",
    "Write a short description of the image.",
    "Tell me about this image.",
)

CAPTIONS = (
    "A {size} {color} {shape} on a pale background.",
    "A single {color} {shape} {place}.",
    "A simple drawing of a {color} {shape}.",
)

DESCRIPTIONS = (
    ("The image shows a {color} {shape} on a plain, pale background. The {shape} is {size} and sits "
    "{place} of the picture. {fact} Its {color} colour fills the whole shape evenly, without any "
    "pattern or outline. There is nothing else in the image besides this single {color} {shape}."),
    ("This is a simple picture of one {color} {shape}. {fact} It is a {size} shape placed {place} of "
    "the frame. The background is an almost white, pale tint, so the {color} {shape} stands out "
    "clearly against it. No other objects appear anywhere in the image."),
    ("In this picture I can see a {size} {color} {shape}. It is drawn {place} of the image, on a light "
    "and empty background. {fact} The colour of the {shape} is a flat, solid {color}. Nothing else "
    "appears in the picture, so the {shape} is the only thing to look at."),
    ("The picture contains exactly one shape: a {color} {shape}. {fact} The {shape} is {size} compared "
    "with the whole image and is located {place}. Apart from the {color} {shape}, the image is empty, "
    "showing only a soft, pale background colour. It looks like a simple illustration of a basic "
    "geometric shape."),
    ("A {color} {shape} is the only object in this image. It appears {place} of the picture and is "
    "{size} in size. {fact} Because the background is so pale, the {color} colour of the {shape} is "
    "easy to recognise. The rest of the image is completely empty."),
)

FACTS = {
    "circle": "A circle is perfectly round, with no corners and no straight edges.",
    "rectangle": "A rectangle has four straight sides that meet at four right-angled corners.",
    "triangle": "A triangle has three straight sides that meet at three pointed corners.",
}


def _fields(record: ImageRecord) -> dict[str, str]:
    row, col = divmod(record.place, 3)
    return {
        "shape": record.shape,
        "color": record.color,
        "size": record.size,
        "place": PLACES[row][col],
        "fact": FACTS[record.shape],
    }


def caption(record: ImageRecord, rng: random.Random) -> str:
    """A one-sentence caption from a randomly chosen template."""
    return rng.choice(CAPTIONS).format(**_fields(record))


def description(record: ImageRecord, rng: random.Random) -> str:
    """A 3-5 sentence description from a randomly chosen template."""
    return rng.choice(DESCRIPTIONS).format(**_fields(record))


def qa_samples(records: list[ImageRecord]) -> list[Sample]:
    """Every easy-vqa question of the split, answered with its one-word easy-vqa answer."""
    return [Sample(i, q, a, "qa") for i, r in enumerate(records) for q, a in r.questions]


def random_sample(records: list[ImageRecord], task: str, rng: random.Random) -> Sample:
    """One caption or description turn for a random image, with a random prompt and template."""
    index = rng.randrange(len(records))
    if task == "caption":
        return Sample(index, rng.choice(CAPTION_PROMPTS), caption(records[index], rng), task)
    if task == "describe":
        return Sample(index, rng.choice(DESCRIBE_PROMPTS), description(records[index], rng), task)
    raise ValueError(f"task must be 'caption' or 'describe', got {task!r}")
