"""LLaVA-NeXT and LLaVA-OneVision targets: "anyres" images, cut into tiles.

The processor resizes an image onto the best of the model's grid pinpoints (`image_grid_pinpoints`),
cuts that into tiles of the vision tower's input size and adds the whole image, shrunk to one tile,
in front. The model's `get_image_features` runs the tower on every tile and packs them per image:
the whole-image tile's patches, then the tiles' patches arranged as one grid, the padding the resize
added cut off again, each grid row ended by the learned `image_newline`. The number of image tokens
thus depends on the image's size, bounded by the largest pinpoint. Positions are the token indices.
"""

from __future__ import annotations

import torch
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.utils import is_torchvision_available

from .adapters import VisionLanguageAdapter


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor without its video processor, which needs torchvision: the image
    processor (transformers' PIL one when torchvision is missing) and the tokenizer only."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs) -> None:
        # ProcessorMixin takes its sub-processors from this signature, so `video_processor` is never
        # looked up (that lookup is what fails without torchvision); it saves the settings this
        # signature names, so each of the parent's is named again
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, image_token=image_token, video_token=video_token,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)


class LlavaNextAdapter(VisionLanguageAdapter):
    """LLaVA-NeXT: a vision tower + projector run on every anyres tile, in front of a causal LM."""

    model_class = LlavaNextForConditionalGeneration

    def image_features(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every image's packed tiles (`pixel_values` [num_images, max_tiles, C, S, S], padded with
        empty tiles; `image_sizes` [num_images, 2] the original (height, width), from which the
        model finds each image's tile grid and padding): [num_image_tokens, H]."""
        out = self.model.model.get_image_features(**images, return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's tiles (at most `vision_aspect_ratio` tiles' worth of tokens per
    image); the processor's `batch_num_images` says whether images were tiled."""

    model_class = LlavaOnevisionForConditionalGeneration

    def load_processor(self, path: str):
        if is_torchvision_available():
            return super().load_processor(path)
        return ImageOnlyLlavaOnevisionProcessor.from_pretrained(path)
