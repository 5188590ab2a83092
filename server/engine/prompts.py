"""Turning chat messages and plain prompts into `PromptInput` with the model's own chat template."""

from __future__ import annotations

from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import get_image_size_for_max_height_width
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .errors import RequestError
from .outputs import PromptInput

# LLaVA-family processors resize the *shortest* edge to the model's input size before cropping, so a
# 100000x1 image becomes 6,400,000x64 float pixels (gigabytes) to keep a 64x64 crop of it. Photos,
# screenshots and even panoramas stay well inside 20:1; beyond it the crop keeps under a twentieth
# of the image, which then carries little the model can use.
MAX_ASPECT_RATIO = 20
MAX_PROCESSED_PIXELS = 4096 * 4096  # what the processor may hold before its crop: ~200 MB as float RGB


class PromptBuilder:
    """Messages: `{"role", "content"}` where content is a string or a list of parts,
    `{"type": "text", "text": str}` or `{"type": "image", "image": PIL.Image.Image}`; other keys (an
    assistant's `tool_calls`, a tool message's `tool_call_id`) go to the chat template as they are."""

    def __init__(self, tokenizer, processor, multimodal: bool) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self.multimodal = multimodal

    def text(self, prompt: str | list[int]) -> PromptInput:
        if isinstance(prompt, str):
            return PromptInput(self.tokenizer.encode(prompt, add_special_tokens=False))
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return PromptInput(list(prompt))

    def check_image_size(self, width: int, height: int) -> None:
        """Refuse an image whose processing would be extreme, from its size alone (known from the
        file's header, before its pixels are decoded). Tokens need no check of their own: a LLaVA
        processor makes the same number of image tokens for every image (its crop's patches), a
        Qwen2-VL one at most its pixel bound over (patch * merge)^2, an Idefics3 one at most
        (tiles of its longest edge + 1) x its tokens per tile, an anyres one (LLaVA-NeXT, OneVision)
        at most (its largest grid pinpoint's tiles + 1) x its tokens per tile, plus one per row."""
        if not self.multimodal:
            raise RequestError("this model does not accept images", param="messages")
        if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise RequestError(f"the image is {width}x{height} pixels; this server accepts aspect ratios up "
                               f"to {MAX_ASPECT_RATIO}:1", param="messages")
        out_height, out_width = processed_size(self.processor.image_processor, height, width)
        if out_height * out_width > MAX_PROCESSED_PIXELS:
            raise RequestError(f"the model's image processor would turn this {width}x{height} image into "
                               f"{out_width}x{out_height} pixels, more than this server's limit of "
                               f"{MAX_PROCESSED_PIXELS}", param="messages")

    @property
    def chat_template(self) -> str | None:
        """The template that renders chats (the processor's for a multimodal model)."""
        owner = self.processor if self.multimodal else self.tokenizer
        return getattr(owner, "chat_template", None)

    def chat(self, messages: list[dict], tools: list[dict] | None = None) -> PromptInput:
        """`tools`: OpenAI function tools, rendered by the template's own `tools` section."""
        if not messages:
            raise RequestError("messages must not be empty", param="messages")
        images = [p["image"] for m in messages for p in _parts(m) if p.get("type") == "image"]
        if images and not self.multimodal:
            raise RequestError("this model does not accept images", param="messages")
        if not self.multimodal:
            flat = [m | {"content": _text_of(m)} for m in messages]
            ids = self.tokenizer.apply_chat_template(flat, tools=tools, add_generation_prompt=True, tokenize=True)
            return PromptInput(list(_input_ids(ids)))
        return self._multimodal(messages, images, tools)

    def _multimodal(self, messages: list[dict], images: list[Image.Image], tools: list[dict] | None) -> PromptInput:
        self._check_placeholders(messages)
        templated = [m | {"content": [_template_part(p) for p in _parts(m)]} for m in messages]
        text = self.processor.apply_chat_template(templated, tools=tools, add_generation_prompt=True, tokenize=False)
        for image in images:
            self.check_image_size(*image.size)
        rgb = [image.convert("RGB") for image in images]
        try:
            encoded = self.processor(text=text, images=rgb or None, return_tensors="pt")
        except (ValueError, TypeError) as exc:  # the processor's own rules on its input (counts, sizes)
            raise RequestError(f"the model's processor refused these messages and images: {exc}",
                               param="messages") from None
        # the image processor's outputs (pixels and, by family, grids, sizes or tile masks) by name
        images = {key: encoded[key] for key in self.processor.image_processor.model_input_names if key in encoded}
        return PromptInput(encoded["input_ids"][0].tolist(), images if rgb else None, len(rgb))

    def _check_placeholders(self, messages: list[dict]) -> None:
        """Refuse text that spells the model's image placeholder: the tokenizer would read it as an
        image token with no image behind it (a processor like Gemma 3's does not count them)."""
        placeholders = {getattr(self.processor, "image_token", None), getattr(self.tokenizer, "image_token", None)}
        for text in _strings(messages):  # texts, tool calls' arguments (image parts hold no strings but "image")
            for placeholder in placeholders - {None, ""}:
                if placeholder in text:
                    raise RequestError(f"the messages contain {placeholder!r}, this model's image placeholder; "
                                       "send images as image parts", param="messages")


def processed_size(image_processor, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the largest array an HF image processor makes of an image before its crop,
    computed with transformers' own resize rules for each `size` layout it documents."""
    size = image_processor.size
    if not getattr(image_processor, "do_resize", True) or size is None:
        return height, width
    if getattr(image_processor, "merge_size", None):  # Qwen2-VL: `size` bounds the pixel count, not an edge
        factor = image_processor.patch_size * image_processor.merge_size
        return smart_resize(height, width, factor, size["shortest_edge"], size["longest_edge"])
    if getattr(image_processor, "image_grid_pinpoints", None):  # anyres: onto the best pinpoint, then tiles
        return select_best_resolution((height, width), image_processor.image_grid_pinpoints)
    if isinstance(getattr(image_processor, "max_image_size", None), dict):  # Idefics3/SmolVLM: the longest
        # edge to `size`, then rows x cols tiles of `max_image_size` (the processor's own count); uncut, at most L x L
        _, rows, cols = image_processor.get_number_of_image_patches(height, width)
        tile = image_processor.max_image_size["longest_edge"]
        return (rows * tile, cols * tile) if rows else (size["longest_edge"], size["longest_edge"])
    if size.get("shortest_edge"):  # CLIP/LLaVA: the shortest edge to this, the other one scaled
        return get_size_with_aspect_ratio((height, width), size["shortest_edge"], size.get("longest_edge"))
    if size.get("max_height") and size.get("max_width"):
        return get_image_size_for_max_height_width((height, width), size["max_height"], size["max_width"])
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    return height, width  # a layout these rules do not know: the image's own size is the estimate


def _parts(message: dict) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])


def _strings(value) -> list[str]:
    """Every string inside nested lists and dicts (a message's text, tool calls' arguments)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for item in value for s in _strings(item)] if isinstance(value, list) else []


def _text_of(message: dict) -> str:
    return "".join(p.get("text", "") for p in _parts(message) if p.get("type") == "text")


def _template_part(part: dict) -> dict:
    # The processor's template only needs to know where images go; pixels are passed separately.
    return {"type": "image"} if part.get("type") == "image" else {"type": "text", "text": part.get("text", "")}


def _input_ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded
