"""The optional Qwen models, pulled into the real cache: a no-op once pulled, minutes and ~5 GB before."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specserve.kernels.cache import default_cache_dir
from specserve.server.store.manifest import read_manifest
from specserve.server.store.pull import pull
from specserve.server.store.registry import CATALOGUE


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_qwen_pull_converts_to_a_bf16_model_that_codes(alias: str) -> None:
    folder = pull(alias, default_cache_dir(), progress=False)
    assert read_manifest(folder).source == f"sha256:{CATALOGUE[alias].source.sha256}"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.config.dtype == torch.bfloat16 and model.config.model_type == "qwen2"
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert "def " in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
