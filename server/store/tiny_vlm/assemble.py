"""Build tiny-vlm's complete HF folder from the committed assets and a SmolLM2-135M-Instruct folder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from .lora import merge_factors
from .model import build_model, build_processor

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny-vlm"
VISION_FILE = "vision_projector.safetensors"
LORA_FILE = "lm_lora.safetensors"
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def assemble(dest: Path, smollm2_dir: Path, assets: Path = ASSETS) -> None:
    """Write a float32 `LlavaForConditionalGeneration` folder (config, weights, processor) to `dest`.

    Deterministic: SmolLM2's weights, the embedding row appended for `<image>` (the mean row), the
    committed bf16 vision tower and projector (upcast), and the committed LoRA merged in float32.
    """
    smollm2_dir, dest = Path(smollm2_dir), Path(dest)
    processor = build_processor(smollm2_dir)
    model = build_model(smollm2_dir, processor.image_token_id)
    vision = {k: v.float() for k, v in load_file(assets / VISION_FILE).items()}
    expected = {k for k in model.state_dict() if k.startswith(VISION_PREFIXES)}
    if set(vision) != expected:
        raise ValueError(f"{VISION_FILE} does not fit: it differs from the model in {set(vision) ^ expected}")
    model.load_state_dict(vision, strict=False)
    if (assets / LORA_FILE).exists():
        merge_factors(model, load_file(assets / LORA_FILE))
    model.generation_config = GenerationConfig(
        bos_token_id=processor.tokenizer.bos_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,  # <|im_end|> closes an assistant turn
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    dest.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(dest)
    processor.save_pretrained(dest)
