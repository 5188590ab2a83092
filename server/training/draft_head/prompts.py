"""Prompts for self-distillation, with held-out parts that training never sees.

Text: instruction templates x topics, split by topic (a held-out topic appears in no training prompt).
Images: easy-vqa's train split for training and its test split for evaluation, asked with tiny-vlm's
own description prompts (`server/store/tiny_vlm/texts.py`); the last of them is held out, so the
held-out set differs from training in both image and wording.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..tiny_vlm.texts import DESCRIBE_PROMPTS

TEXT_TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Write a short paragraph about {topic}.",
    "What are the most important facts about {topic}?",
    "Describe {topic} to a ten-year-old.",
    "Give me three tips related to {topic}.",
    "Why is {topic} important?",
)
TOPICS = (
    "photosynthesis", "the water cycle", "volcanoes", "the moon", "honey bees", "rainbows",
    "the human heart", "recycling", "electric cars", "the internet", "gravity", "dinosaurs",
    "the ocean", "clouds", "healthy sleep", "learning a new language", "saving money", "exercise",
    "drinking water", "the solar system", "earthquakes", "trees", "birds", "the weather",
    "computers", "music", "reading books", "cooking pasta", "friendship", "time management",
    "the seasons", "deserts", "rivers", "mountains", "the brain", "vaccines", "bicycles",
    "public libraries", "gardening", "coffee", "chess", "football", "the Roman Empire",
    "ancient Egypt", "wind energy", "solar panels", "plastic pollution", "climate change",
    "the immune system", "teeth brushing", "smartphones", "writing an essay", "job interviews",
    "cats", "dogs", "elephants", "the rainforest", "snow", "lightning", "magnets",
    "the printing press", "airplanes", "trains", "bread baking", "yoga", "meditation",
    "museums", "stars", "telescopes", "maps",
)
HELD_OUT_TOPICS = 10  # the last topics: evaluation only
HELD_OUT_DESCRIBE = DESCRIBE_PROMPTS[-1]
TRAIN_DESCRIBE = DESCRIBE_PROMPTS[:-1]


@dataclass(frozen=True)
class PromptSpec:
    """One user turn: text, plus an easy-vqa image path for multimodal prompts."""

    text: str
    image: str | None = None


def text_prompts(held_out: bool) -> list[PromptSpec]:
    """Every template x topic prompt of the training or the held-out topics, in a fixed order."""
    topics = TOPICS[-HELD_OUT_TOPICS:] if held_out else TOPICS[:-HELD_OUT_TOPICS]
    return [PromptSpec(t.format(topic=topic)) for topic in topics for t in TEXT_TEMPLATES]


def image_prompts(held_out: bool, count: int, seed: int) -> list[PromptSpec]:
    """`count` description prompts on distinct images: train split + training wordings, or test
    split + the held-out wording."""
    from ..tiny_vlm.data import load_split  # reads easy-vqa's files: only when asked

    rng = random.Random(seed)
    records = load_split("test" if held_out else "train")
    chosen = rng.sample(records, min(count, len(records)))
    if held_out:
        return [PromptSpec(HELD_OUT_DESCRIBE, r.path) for r in chosen]
    return [PromptSpec(rng.choice(TRAIN_DESCRIBE), r.path) for r in chosen]


def sample_prompts(prompts: list[PromptSpec], count: int, seed: int) -> list[PromptSpec]:
    """A seeded subset of `count` prompts (all of them if there are fewer)."""
    return random.Random(seed).sample(prompts, min(count, len(prompts)))
