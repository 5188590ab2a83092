"""What the engine takes and returns per request."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .metrics import SpecMetrics


@dataclass(frozen=True)
class PromptInput:
    """A tokenized prompt. For vision-language models `token_ids` already holds the expanded image
    placeholder tokens and `images` the processor's image tensors, keyed as the model's own forward
    takes them: `pixel_values` and, by family, `image_grid_thw` (Qwen2-VL: each image's patch grid),
    `image_sizes` (LLaVA-NeXT / OneVision: each image's size before tiling), `pixel_attention_mask`
    (Idefics3: the real pixels of padded tiles). None for text-only prompts."""

    token_ids: list[int]
    images: dict[str, torch.Tensor] | None = None
    num_images: int = 0


def image_tensors(images: dict[str, torch.Tensor] | None, device: torch.device | str,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A prompt's `images` on `device`, the floating ones (pixels) in the model's `dtype`; {} for None."""
    return {key: value.to(device, dtype if value.is_floating_point() else value.dtype)
            for key, value in (images or {}).items()}


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass(frozen=True)
class StepOutput:
    """What one engine step added to a sequence (possibly several tokens).

    Each token's origin: `depths[i]` is the tree depth (1, 2, ...) of an accepted draft token, or 0
    for a token the target chose itself (the bonus token of a verify step, or prefill's first token);
    `token_texts[i]` is the part of `text` released with that token (text held back, a partial
    character or a possible stop string, goes to the token that releases it), so they join to `text`.
    """

    token_ids: list[int]
    text: str  # incremental detokenized text; stop strings and held-back partial characters excluded
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string) or "length"
    depths: list[int]
    token_texts: list[str]


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    metrics: SpecMetrics
    logprobs: list[TokenLogprob] | None = None
