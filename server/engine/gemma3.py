"""Gemma 3 vision-language targets: a SigLIP tower, each image pooled to a fixed number of tokens,
seen bidirectionally within the image during prefill.

An image becomes `mm_tokens_per_image` soft tokens (the tower's patches average-pooled, normed and
projected), whatever its size; the processor wraps them as "\\n\\n<boi> <image> x N <eoi>\\n\\n".
Pan-and-scan crops stay off (`Gemma3Processor`'s default, which the server does not override).

In prefill the tokens of one run of image tokens attend to each other both ways (the model's mask
from `token_type_ids`), the rest causally; after the prompt everything is causal.
`bidirectional_blocks` numbers those runs with the model's own `get_block_sequence_ids_for_mask`, so
the engine's prefill mask groups tokens as the model's does, and chunked prefill never cuts an image
(`kernels.blocks`). Sliding-window layers get the engine's masks limited to their window
(`TargetModel.layer_masks`); in prefill: window AND (causal OR image block), the model's own rule.
Text embeddings are scaled inside the model's embedding layer, so `get_input_embeddings()` returns
what the decoder consumes.
"""

from __future__ import annotations

import torch
from transformers import Gemma3ForConditionalGeneration
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from .adapters import VisionLanguageAdapter


class Gemma3Adapter(VisionLanguageAdapter):
    """Gemma 3 (`Gemma3ForConditionalGeneration`): images at `image_token_id`, bidirectional per image."""

    model_class = Gemma3ForConditionalGeneration

    def image_features(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled, projected soft tokens of every image: [num_images * mm_tokens_per_image, H]."""
        out = self.model.model.get_image_features(images["pixel_values"], return_dict=True)
        return out.pooler_output.flatten(0, 1)

    def token_types(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The processor's `token_type_ids` (image 1, text 0): without them `generate` prefills causally."""
        return {"token_type_ids": (token_ids == self.image_token_id).long()}

    def bidirectional_blocks(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[L]: each run of image tokens numbered 0, 1, ... in prompt order, -1 at text tokens."""
        token_types = self.token_types(token_ids)["token_type_ids"]
        return get_block_sequence_ids_for_mask(token_types, device=token_ids.device)[0]
