"""The engine on the CPU attention kernel (`--attention kernel`, the default on the CPU): a float32 batch
with joins and leaves equals the stock model's `generate`, and in bfloat16 drafting in a batch gives
plain decoding of each sequence alone, token for token (the kernel and the packed linear layers give a
row the same bits whatever shares its forward)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.drafting.budget import TreeBudget
from specserve.kernels import cpu_attention
from specserve.kernels.grouped_attention import KERNEL_NAME
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams

from ..conftest import make_tiny_model
from .test_engine_batch import PROMPTS, run_batched

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU attention kernel did not build here")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Head dimension 16, the smallest the kernel takes (the shared tiny models have 8)."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("kernel-llama"), hidden=64)


@pytest.fixture
def calls(monkeypatch):
    """How many attention calls went to the kernel, padded and packed."""
    counts = {"padded": 0, "packed": 0}
    attend = cpu_attention.attend

    def counting(query, key, value, mask, scale, packed_rows=None):
        counts["packed" if packed_rows is not None else "padded"] += 1
        return attend(query, key, value, mask, scale, packed_rows)

    monkeypatch.setattr(cpu_attention, "attend", counting)
    return counts


def engine_for(path, dtype: str) -> Engine:
    """Every row verifies its whole tree (`batch_tree_tokens=0`): the timing-driven planner could choose
    plain decoding on a busy machine, and then nothing here would be drafted."""
    engine = Engine.from_config(EngineConfig(model=str(path), draft="ngram", dtype=dtype, batch_tree_tokens=0,
                                             tree=TreeBudget(depth=4, branching=3, draft_nodes=8)))
    assert engine.target.model.config._attn_implementation == KERNEL_NAME
    return engine


def test_float32_batch_with_joins_and_leaves_equals_the_stock_models_generate(model_dir, calls):
    engine = engine_for(model_dir, "float32")
    stock = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    params = [SamplingParams(max_tokens=n) for n in (30, 24, 36, 12, 40)]
    arrivals = [(join, engine.prepare_text(text), p) for join, text, p in zip((0, 0, 2, 5, 5), PROMPTS, params)]
    tokens, largest, seqs = run_batched(engine, arrivals)
    assert largest >= 4
    for i, (_, prompt, p) in enumerate(arrivals):
        ids = torch.tensor([prompt.token_ids])
        expected = stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=p.max_tokens)[0, ids.shape[1]:].tolist()
        assert tokens[i] == expected, PROMPTS[i]
    assert sum(seq.metrics.accepted_draft_tokens for seq in seqs.values()) > 0
    assert calls["padded"] > 0 and calls["packed"] > 0  # both kinds of batch ran on the kernel


def test_bfloat16_drafting_in_a_batch_gives_plain_decoding_alone(model_dir, calls):
    engine = engine_for(model_dir, "bfloat16")
    prompts = [engine.prepare_text(text) for text in PROMPTS]
    alone = [engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True, speculative=False)).token_ids
             for prompt in prompts]
    tokens, largest, seqs = run_batched(engine, [(0, prompt, SamplingParams(max_tokens=40, ignore_eos=True))
                                                 for prompt in prompts])
    assert largest == len(prompts)
    assert [tokens[i] for i in range(len(prompts))] == alone
    assert sum(seq.metrics.accepted_draft_tokens for seq in seqs.values()) > 0
    assert calls["padded"] > 0
