"""Which model families the engine serves and which it refuses.

Served untouched: text-only causal LMs of the common families, each a tiny random model built here
and loaded through `AutoModelForCausalLM`, whose greedy output with n-gram drafting equals its own
`generate(do_sample=False)`. Refused at load time, before any weights are read, with one ValueError
that names the config class: a vision-language config without an adapter (it would load as a
causal LM without its images, if at all), a config that is no causal LM, and layer kinds the KV
slot cache cannot serve (linear attention, chunked attention)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from specserve.drafting.budget import TreeBudget
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.target import load_model

from ..conftest import build_tokenizer

MAX_NEW = 30
PROMPT = "a red circle, a blue square. a red circle, a blue"  # outputs repeat: n-gram drafts get accepted
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
# config class name -> dtype: float64 where transformers runs it (exact to the last bit); its grouped
# MoE matmul takes no float64, so the mixture-of-experts families run in float32
SERVED = {
    "LlamaConfig": "float64",
    "Qwen2Config": "float64",
    "Qwen3Config": "float64",
    "MistralConfig": "float64",
    "Gemma2Config": "float64",
    "Gemma3TextConfig": "float64",
    "Phi3Config": "float64",
    "PhiConfig": "float64",
    "Olmo2Config": "float64",
    "GraniteConfig": "float64",
    "SmolLM3Config": "float64",
    "StableLmConfig": "float64",
    "Cohere2Config": "float64",
    "Starcoder2Config": "float64",
    "Glm4Config": "float64",
    "Exaone4Config": "float64",
    "GPT2Config": "float64",  # decoders at `transformer` / `gpt_neox` / `model.decoder`, not `model`
    "GPTNeoXConfig": "float64",
    "FalconConfig": "float64",
    "OPTConfig": "float64",
    "MixtralConfig": "float32",
    "Qwen3MoeConfig": "float32",
}
# random GPT-2 / OPT outputs do not repeat, so n-gram drafts are never accepted: the model itself
# drafts as a separate draft LM instead, so that trees are still verified
SELF_DRAFTED = {"GPT2Config", "OPTConfig"}
# config class name -> what the error names (the rule that refused it)
REFUSED = {
    "PaliGemmaConfig": "multimodal",  # image-text-to-text, and no causal LM class
    "MllamaConfig": "multimodal",  # image-text-to-text that AutoModelForCausalLM would load text-only
    "Llama4Config": "multimodal",
    "Mistral3Config": "multimodal",
    "InternVLConfig": "multimodal",
    "AriaConfig": "multimodal",
    "Qwen3NextConfig": "linear_attention",
    "Llama4TextConfig": "chunked_attention",
    "T5Config": "not a causal language model",
}


def make_tiny(name: str, path: Path) -> Path:
    tokenizer = build_tokenizer(path)
    eos = tokenizer.eos_token_id
    config = getattr(transformers, name)(**COMMON, vocab_size=len(tokenizer), eos_token_id=eos,
                                         bos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)  # sharpen random logits away from near ties
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", SERVED)
def test_text_family_greedy_matches_generate(tmp_path, name):
    path = make_tiny(name, tmp_path)
    engine = Engine.from_config(EngineConfig(
        model=str(path), draft=str(path) if name in SELF_DRAFTED else "ngram", dtype=SERVED[name], batch_tree_tokens=0,
        tree=TreeBudget(depth=4, branching=3, draft_nodes=8)))
    assert type(engine.target.model.config).__name__ == name
    prompt = engine.prepare_text(PROMPT)
    out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))
    ids = torch.tensor([prompt.token_ids])
    expected = engine.target.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)
    assert out.token_ids == expected[0, ids.shape[1]:].tolist()
    assert out.metrics.accepted_draft_tokens > 0  # trees were verified, not only single tokens


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_family_is_refused_before_loading(tmp_path, name):
    getattr(transformers, name)().save_pretrained(tmp_path)  # a config alone: no weights to load
    with pytest.raises(ValueError, match=REFUSED[name]) as refused:
        load_model(str(tmp_path), "float32", "cpu")
    assert name in str(refused.value)
    if REFUSED[name] == "multimodal":  # the message lists what is served instead
        assert "LlavaConfig" in str(refused.value) and "AutoModelForCausalLM" in str(refused.value)


def test_engine_refuses_a_vision_language_model_without_an_adapter(tmp_path):
    transformers.PaliGemmaConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="PaliGemmaConfig"):
        Engine.from_config(EngineConfig(model=str(tmp_path)))
