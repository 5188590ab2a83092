"""What `specserve bench` sends: a built-in prompt set (text, synthetic images, or both interleaved) or
a JSONL file, each entry one chat request.

A JSONL line is an object with either `"prompt"` (the user's text) or `"messages"` (OpenAI chat
messages, sent as they are), and optionally `"image"` (a file path or an http(s)/data URL, put before
the prompt's text) and `"max_tokens"` (this request's length instead of the command's):

    {"prompt": "Summarise: ...", "max_tokens": 64}
    {"prompt": "What colour is the shape?", "image": "shapes/red.png"}
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .prompts import PROMPT_SETS, SUMMARISE_EDIT

IMAGE_QUESTION = "Describe the image in detail."
COLOURS = ["red", "blue", "green", "orange"]


@dataclass(frozen=True)
class BenchRequest:
    messages: list[dict]
    max_tokens: int | None = None  # the dataset's own length; None: the command's --max-tokens


def shape_image(i: int) -> Image.Image:
    """A 96x96 PNG-able picture: a circle in the i-th colour on white."""
    image = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(image).ellipse((20, 20, 76, 76), fill=COLOURS[i % len(COLOURS)])
    return image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, image_url: str | None = None) -> BenchRequest:
    if image_url is None:
        return BenchRequest([{"role": "user", "content": text}])
    parts = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return BenchRequest([{"role": "user", "content": parts}])


def with_images(texts: list[str]) -> list[BenchRequest]:
    """Each text followed by a picture question, so that even a short run sends both kinds."""
    return [r for i, text in enumerate(texts) for r in (user(text), user(IMAGE_QUESTION, data_url(shape_image(i))))]


def builtin(name: str) -> list[BenchRequest]:
    """A built-in set: `images`, `mixed` (summarise-edit interleaved with images) or a text set."""
    if name == "images":
        return [user(IMAGE_QUESTION, data_url(shape_image(i))) for i in range(len(COLOURS))]
    if name == "mixed":
        return with_images(SUMMARISE_EDIT)
    return [user(text) for text in PROMPT_SETS[name]]


DATASETS = sorted([*PROMPT_SETS, "images", "mixed"])


def load_jsonl(path: Path) -> list[BenchRequest]:
    """The requests of a JSONL file (format above); a bad line raises ValueError naming it."""
    requests = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            requests.append(_entry(json.loads(line), Path(path).parent))
        except (ValueError, TypeError, OSError) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from exc
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


def _entry(entry: object, folder: Path) -> BenchRequest:
    if not isinstance(entry, dict):
        raise ValueError("each line must be a JSON object")
    max_tokens = entry.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise ValueError("max_tokens must be a positive integer")
    if "messages" in entry:
        if not isinstance(entry["messages"], list) or not entry["messages"] or "prompt" in entry or "image" in entry:
            raise ValueError('"messages" must be a non-empty list, without "prompt" or "image"')
        return BenchRequest(entry["messages"], max_tokens)
    if not isinstance(entry.get("prompt"), str):
        raise ValueError('each line needs "prompt" (a string) or "messages"')
    image = entry.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError('"image" must be a file path or a URL')
    url = None if image is None else _image_url(image, folder)
    return BenchRequest(user(entry["prompt"], url).messages, max_tokens)


def _image_url(image: str, folder: Path) -> str:
    """URLs are sent as they are; a file (relative to the dataset's folder) becomes a data URL."""
    if image.startswith(("http://", "https://", "data:")):
        return image
    path = folder / image
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()
