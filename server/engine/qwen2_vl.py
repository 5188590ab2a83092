"""Qwen2-VL family targets (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): multimodal rotary positions (M-RoPE).

The decoder rotates each token by three position rows (temporal, height, width). A text token has
the same position on all three; an image's tokens get their (t, h, w) grid coordinates, offset by
the position where the image starts; text after an image continues from the image's largest
position + 1. An image of h x w tokens thus spans max(h, w) positions, not h * w, and every token
after the prompt sits at (its index in the sequence) + `rope_delta`, the same on all three rows.
The model's own `get_rope_index` computes the prompt's positions; nothing of HF's code is copied.
Qwen3-VL also adds "deepstack" features: the vision tower's intermediate layers, merged, are added to
the outputs of the decoder's first layers at the image tokens (`ImageEmbeds.deepstack`, passed to
each prefill chunk by `PromptEmbeds.chunk_inputs`); after the prompt nothing changes.

Example (text "ab", an image of 2 x 3 merged tokens, text "c"; rows t / h / w):
    index     0 1 | 2 3 4 5 6 7 | 8
    t         0 1 | 2 2 2 2 2 2 | 5
    h         0 1 | 2 2 2 3 3 3 | 5
    w         0 1 | 2 3 4 2 3 4 | 5
The image starts at 2 and spans max(2, 3) = 3 positions, so "c" sits at 5 and `rope_delta` is
5 - 8 = -3: the next token (index 9) takes position 6, and a tree node at depth d after a prefix of
n cached tokens takes n + rope_delta + d on every row.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.utils import is_torchvision_available

from .adapters import ImageEmbeds, RopeIndex, VisionLanguageAdapter
from .errors import RequestError
from .outputs import PromptInput


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor, which needs torchvision: the image
    processor (transformers' PIL one when torchvision is missing) and the tokenizer only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        # ProcessorMixin takes its sub-processors from this signature, so `video_processor` is never
        # looked up (that lookup is what fails without torchvision)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without its video processor (which needs torchvision), as above."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2VLAdapter(VisionLanguageAdapter):
    """Qwen2-VL / Qwen2.5-VL: a vision tower (`model.model.visual`) in front of an M-RoPE decoder."""

    model_class = AutoModelForImageTextToText
    processor_class = ImageOnlyQwen2VLProcessor  # where torchvision is missing

    def image_features(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """Merged visual embeddings of every image: [num_image_tokens, H]. The flattened patches of all
        images (`pixel_values` [num_patches, C * T * P * P]) need each image's (t, h, w) patch grid
        (`image_grid_thw`)."""
        out = self.model.model.get_image_features(**images, return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)

    def rope_index(self, token_ids: torch.Tensor, images: dict[str, torch.Tensor]) -> RopeIndex | None:
        """The prompt's M-RoPE positions (`token_ids` [1, L]); None without images, where every row
        is the token index (the decoder's own default)."""
        if not images:
            return None
        positions, deltas = self.model.model.get_rope_index(
            token_ids, image_grid_thw=images["image_grid_thw"], **self.token_types(token_ids))
        return RopeIndex(positions, int(deltas))

    def check_prompt(self, prompt: PromptInput) -> None:
        """Each image must be its own run of image tokens: the rotary index reads runs as images, so two
        images with nothing between them (a chat template without Qwen's vision start / end markers)
        cannot be placed."""
        if not prompt.images:
            return
        ids = torch.tensor(prompt.token_ids)
        is_image = ids == self.image_token_id
        runs = int(is_image[0]) + int((is_image[1:] & ~is_image[:-1]).sum())
        if runs != len(prompt.images["image_grid_thw"]):
            raise RequestError(f"the prompt's {len(prompt.images['image_grid_thw'])} images became {runs} runs "
                               "of image tokens: this chat template puts images side by side with nothing "
                               "between them, which this model cannot tell apart", param="messages")

    def token_types(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Text 0, image 1 (no videos here): without them `generate` puts images at plain positions."""
        return {"mm_token_type_ids": (token_ids == self.image_token_id).long()}

    def load_processor(self, path: str):
        if is_torchvision_available():
            return super().load_processor(path)
        return self.processor_class.from_pretrained(path)


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's layout and rotary index, plus deepstack features for the first layers."""

    processor_class = ImageOnlyQwen3VLProcessor

    def embed_images(self, images: dict[str, torch.Tensor]) -> ImageEmbeds:
        """Merged visual embeddings [num_image_tokens, H] and, per deepstack layer, the same rows of
        that tower layer's merged features."""
        out = self.model.model.get_image_features(**images, return_dict=True)
        deepstack = [torch.cat(list(per_image), dim=0) for per_image in out.deepstack_features]
        return ImageEmbeds(torch.cat(list(out.pooler_output), dim=0), deepstack)
