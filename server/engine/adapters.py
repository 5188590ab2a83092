"""Where the parts of a model family live: one small adapter per config class (`target.ADAPTERS`).

Families differ in where their decoder, LM head, token embeddings and vision tower sit, how their
images become embeddings, and (M-RoPE families) how prompt tokens map to rotary positions; nothing
here dispatches on model-name strings and no HF modeling code is forked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration, PretrainedConfig

from .outputs import PromptInput


@dataclass(frozen=True)
class ImageEmbeds:
    """What a prompt's images become for the decoder."""

    features: torch.Tensor  # [num_image_tokens, H] the embeddings at the image tokens, in prompt order
    deepstack: list[torch.Tensor] | None = None  # Qwen3-VL: per early layer, [num_image_tokens, H] added
    # to that layer's output at the image tokens


@dataclass(frozen=True)
class RopeIndex:
    """A prompt's rotary positions where they are not the token indices (M-RoPE with images)."""

    position_ids: torch.Tensor  # [3, 1, L] long: temporal / height / width rows
    rope_delta: int  # position - index of every token after the prompt (<= 0: an image takes fewer positions)


class CausalLMAdapter:
    """Where the parts of an `AutoModelForCausalLM` model live."""

    model_class = AutoModelForCausalLM

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @property
    def decoder(self) -> torch.nn.Module:
        return self.model.base_model  # `model.model` (Llama, Qwen, ...), `transformer` (GPT-2, Falcon), ...

    @property
    def text_config(self) -> PretrainedConfig:
        return self.model.config

    image_token_id: int | None = None

    def image_features(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """Visual embeddings of a prompt's images (`PromptInput.images`, on the model's device and
        dtype), concatenated in prompt order: [num_image_tokens, H], one row per image token."""
        raise ValueError("this model does not take images")

    def embed_images(self, images: dict[str, torch.Tensor]) -> ImageEmbeds:
        """Everything the decoder takes of a prompt's images: `image_features`, and what a family adds
        inside the decoder (Qwen3-VL's deepstack features)."""
        return ImageEmbeds(self.image_features(images))

    def rope_index(self, token_ids: torch.Tensor, images: dict[str, torch.Tensor]) -> RopeIndex | None:
        """Rotary positions of a prompt (`token_ids` [1, L], its `images` as for `image_features`);
        None: position = token index, the decoder's own default."""
        return None

    def check_prompt(self, prompt: PromptInput) -> None:
        """Raise `RequestError` for a processed prompt this family cannot place its images in; runs
        when the prompt is prepared, before the request is queued."""

    def token_types(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model's own `forward` / `generate` needs, besides the images, to tell a prompt's
        image tokens from its text (`token_ids` [B, L]): {} for most families."""
        return {}

    def bidirectional_blocks(self, token_ids: torch.Tensor) -> torch.Tensor | None:
        """Spans of a prompt with images (`token_ids` [1, L]) whose tokens see each other both ways in
        prefill (`kernels.blocks`): [L] long, the span's id at its tokens, -1 elsewhere; None: causal."""
        return None

    def load_processor(self, path: str):
        """The processor that turns chats with images into token ids and pixel values."""
        return AutoProcessor.from_pretrained(path)


class VisionLanguageAdapter(CausalLMAdapter):
    """A vision tower in front of a causal LM (`model.model.language_model`), the layout that HF's
    image-text-to-text models share: the LM's config is `text_config`, images sit at `image_token_id`."""

    @property
    def decoder(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def text_config(self) -> PretrainedConfig:
        return self.model.config.text_config

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id


class LlavaAdapter(VisionLanguageAdapter):
    """LLaVA: a vision tower + projector in front of a causal LM."""

    model_class = LlavaForConditionalGeneration

    def image_features(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tower's patches of every image, projected: [num_image_tokens, H]."""
        out = self.model.model.get_image_features(**images, return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)
