"""Turning chat messages and plain prompts into `PromptInput` with the model's own chat template."""

from __future__ import annotations

from PIL import Image

from .errors import RequestError
from .outputs import PromptInput


class PromptBuilder:
    """Messages: `{"role", "content"}` where content is a string or a list of parts,
    `{"type": "text", "text": str}` or `{"type": "image", "image": PIL.Image.Image}`."""

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

    def chat(self, messages: list[dict]) -> PromptInput:
        if not messages:
            raise RequestError("messages must not be empty", param="messages")
        images = [p["image"] for m in messages for p in _parts(m) if p.get("type") == "image"]
        if images and not self.multimodal:
            raise RequestError("this model does not accept images", param="messages")
        if not self.multimodal:
            flat = [{"role": m["role"], "content": _text_of(m)} for m in messages]
            ids = self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True)
            return PromptInput(list(_input_ids(ids)))
        return self._multimodal(messages, images)

    def _multimodal(self, messages: list[dict], images: list[Image.Image]) -> PromptInput:
        templated = [
            {"role": m["role"], "content": [_template_part(p) for p in _parts(m)]} for m in messages
        ]
        text = self.processor.apply_chat_template(templated, add_generation_prompt=True, tokenize=False)
        rgb = [image.convert("RGB") for image in images]
        encoded = self.processor(text=text, images=rgb or None, return_tensors="pt")
        pixel_values = encoded.get("pixel_values") if rgb else None
        return PromptInput(encoded["input_ids"][0].tolist(), pixel_values, len(rgb))


def _parts(message: dict) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])


def _text_of(message: dict) -> str:
    return "".join(p.get("text", "") for p in _parts(message) if p.get("type") == "text")


def _template_part(part: dict) -> dict:
    # The processor's template only needs to know where images go; pixels are passed separately.
    return {"type": "image"} if part.get("type") == "image" else {"type": "text", "text": part.get("text", "")}


def _input_ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded
