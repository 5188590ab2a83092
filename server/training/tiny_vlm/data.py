"""easy-vqa as tiny-vlm training data: per-image labels, captions, descriptions and QA samples.

easy-vqa (the pip package) ships 64x64 PNGs with one shape each and ~10 questions per image, but no
label file. The labels come from the questions ("what color is the shape?" -> colour); for the ~11%
of images whose questions leave the shape or colour open, the pixels decide among the remaining
candidates (the images are flat colour fills, so the median colour and the bounding-box fill ratio
are unambiguous). Size and position, used only in descriptions, come from the bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SIZES = ("small", "medium", "large")
# Rows: top/middle/bottom third of the image, columns: left/centre/right third.
PLACES = (
    ("near the top left corner", "near the top edge", "near the top right corner"),
    ("on the left side", "right in the middle", "on the right side"),
    ("near the bottom left corner", "near the bottom edge", "near the bottom right corner"),
)
NUM_PLACES = 9

# The generator's pure fills; anti-aliased edges are excluded by taking the median pixel.
_PALETTE = {
    "black": (0, 0, 0), "blue": (0, 0, 255), "brown": (165, 42, 42), "gray": (128, 128, 128),
    "green": (0, 255, 0), "red": (255, 0, 0), "teal": (0, 128, 128), "yellow": (255, 255, 0),
}
# Area of a shape over its bounding box: a triangle fills ~1/2, a circle pi/4, a rectangle all of it.
_FILL = {"triangle": 0.55, "circle": 0.80, "rectangle": 0.99}


@dataclass(frozen=True)
class ImageRecord:
    """One easy-vqa image with its labels and its questions [(question, answer), ...]."""

    path: str
    shape: str
    color: str
    size: str
    place: int  # row * 3 + column in PLACES
    questions: tuple[tuple[str, str], ...]


def load_split(split: str) -> list[ImageRecord]:
    """Labelled images of easy-vqa's "train" (4,000) or "test" (1,000) split, ordered by image id."""
    import easy_vqa  # the `train` extra: imported here so that serving never needs it

    if split == "train":
        texts, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    questions: dict[int, list[tuple[str, str]]] = {i: [] for i in paths}
    for text, answer, image_id in zip(texts, answers, ids):
        questions[image_id].append((text, answer))
    return [_label(paths[i], tuple(questions[i])) for i in sorted(paths)]


def _label(path: str, questions: tuple[tuple[str, str], ...]) -> ImageRecord:
    shapes, colors = _candidates(questions)
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    background = colours[counts.argmax()]  # a shape may touch the border, but never covers most of it
    mask = np.abs(pixels - background).sum(-1) > 60
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (height * width)
    median = np.median(pixels[mask], axis=0)
    shape = min(shapes, key=lambda s: abs(_FILL[s] - fill))
    color = min(colors, key=lambda c: float(np.abs(median - _PALETTE[c]).sum()))
    side = max(height, width)
    size = SIZES[0] if side < 18 else SIZES[1] if side < 28 else SIZES[2]  # terciles of the train split
    row, col = (int((ys.min() + ys.max()) / 2 * 3 // 64), int((xs.min() + xs.max()) / 2 * 3 // 64))
    return ImageRecord(path, shape, color, size, row * 3 + col, questions)


def _candidates(questions: tuple[tuple[str, str], ...]) -> tuple[list[str], list[str]]:
    """Shapes and colours consistent with every answer (wh- answers name one, yes/no rule in or out)."""
    shapes, colors = set(SHAPES), set(COLORS)
    for text, answer in questions:
        words = text.rstrip("?").split()
        named_shapes, named_colors = set(words) & set(SHAPES), set(words) & set(COLORS)
        if answer in SHAPES or answer in COLORS:
            shapes &= {answer} if answer in SHAPES else named_shapes or shapes
            colors &= {answer} if answer in COLORS else named_colors or colors
            continue
        negated = " not " in f" {text} " or text.startswith("is no ")
        present = (answer == "yes") != negated
        if named_shapes:
            shapes = shapes & named_shapes if present else shapes - named_shapes
        else:
            colors = colors & named_colors if present else colors - named_colors
    return sorted(shapes), sorted(colors)
