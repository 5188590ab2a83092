"""Idefics3 family targets (Idefics3, SmolVLM): a SigLIP-style vision tower whose patches are
pixel-shuffled and projected into a Llama-style decoder at `model.model.text_model`.

The processor splits an image into tiles (rows x cols of `max_image_size`, after its longest edge is
scaled to `size["longest_edge"]`) plus the whole image shrunk to one tile; every tile becomes the
same number of image tokens (`image_seq_len`), so an image's token count depends on its size.
Example (tiles of 32 pixels, longest edge scaled to 64, 4 tokens a tile): a 48x40 image becomes 2x2
tiles + the global one, 5 tiles in `pixel_values` [1, 5, 3, 32, 32] and 20 image tokens, each tile
framed by its own marker tokens (`<row_1_col_1>`, ..., `<global-img>`).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText, ProcessorMixin
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
from transformers.utils import is_num2words_available, is_torchvision_available

from .adapters import VisionLanguageAdapter


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLM's processor without its video processor (which needs torchvision) and without
    num2words (which only its video prompts use): the image processor and the tokenizer only, with
    SmolVLM's own image prompts (each tile's markers and image tokens)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None,
                 **kwargs) -> None:
        # SmolVLMProcessor.__init__ refuses to run without num2words, so the attributes its image
        # prompts read are set here: the tokenizer's own token names, SmolVLM's defaults otherwise.
        # ProcessorMixin takes its sub-processors from this signature, so `video_processor` is never looked up.
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        self.image_seq_len = image_seq_len
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLM's own only adds video sampling defaults, read from the video processor this one lacks
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


class Idefics3Adapter(VisionLanguageAdapter):
    """Idefics3: the decoder is `model.model.text_model` (the LM config is `text_config`, images sit at
    `image_token_id`, as in `VisionLanguageAdapter`)."""

    model_class = AutoModelForImageTextToText

    @property
    def decoder(self) -> torch.nn.Module:
        return self.model.model.text_model

    def image_features(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected patches of every tile of every image, in prompt order: [num_image_tokens, H].
        `pixel_values` [1, num_tiles, C, S, S]; `pixel_attention_mask` [1, num_tiles, S, S] marks the
        pixels that are not padding."""
        out = self.model.model.get_image_features(
            pixel_values=images["pixel_values"], pixel_attention_mask=images.get("pixel_attention_mask"),
            return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's layout; its processor also takes videos, which this server does not."""

    def load_processor(self, path: str):
        if is_torchvision_available() and is_num2words_available():
            return super().load_processor(path)
        return ImageOnlySmolVLMProcessor.from_pretrained(path)
