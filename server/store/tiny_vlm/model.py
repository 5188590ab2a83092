"""tiny-vlm's configs, processor and model, built from a SmolLM2-135M-Instruct folder.

SmolLM2's tokenizer has no image token, so `<image>` is appended as id 49152 and the (tied)
embedding matrix grows by one row, set to the mean of the existing rows. That row is only ever read
as an output embedding: the image placeholders' input embeddings are replaced by projected image
features. A mean row scores like an average token, far below the top logits, so greedy decoding
never picks it (`evaluate` counts it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 64
PATCH_SIZE = 16
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16: the CLS token is dropped ("default")
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2's own template (same default system turn) where a message's content may also be a list
# of {"type": "image"} / {"type": "text"} parts; an image part becomes the `<image>` placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vision_config() -> CLIPVisionConfig:
    """A 3-layer, 192-wide ViT over 4x4 patches of 16 pixels (~1.4M parameters)."""
    return CLIPVisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=3,
        num_attention_heads=3,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=192,
    )


def build_processor(smollm2_dir: Path) -> LlavaProcessor:
    """SmolLM2's tokenizer plus `<image>`, a 64-pixel CLIP image processor and the chat template."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, removed again by "default"
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def llava_config(smollm2_dir: Path, image_token_id: int) -> LlavaConfig:
    """LLaVA config: our vision tower, SmolLM2's text config with the vocabulary grown by `<image>`."""
    text_config = LlamaConfig.from_pretrained(smollm2_dir)
    text_config.vocab_size = image_token_id + 1
    return LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def build_model(smollm2_dir: Path, image_token_id: int) -> LlavaForConditionalGeneration:
    """A LLaVA model with SmolLM2's weights (embedding grown by the mean row) and a fresh vision side.

    The vision tower and projector get a seeded random init; callers load trained weights.
    """
    config = llava_config(smollm2_dir, image_token_id)
    # The language model is built on the meta device and then takes SmolLM2's tensors as they are:
    # a random init of 135M parameters only to overwrite it would double the build time.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = CLIPVisionModel(config.vision_config)
    model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    lm_weights = load_file(Path(smollm2_dir) / "model.safetensors")
    embed = lm_weights.pop("model.embed_tokens.weight").float()
    if embed.shape[0] != image_token_id:
        raise ValueError(f"expected a {image_token_id}-token SmolLM2 vocabulary, got {embed.shape[0]}")
    lm_weights["model.embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    lm_weights.pop("lm_head.weight", None)  # tied to the embedding
    model.model.language_model.load_state_dict(
        {k.removeprefix("model."): v.float() for k, v in lm_weights.items()}, strict=True, assign=True
    )
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.model.language_model.rotary_emb = type(model.model.language_model.rotary_emb)(config.text_config)
    return model
