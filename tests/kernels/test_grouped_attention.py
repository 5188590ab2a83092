"""Grouped-query attention with the group folded into the query: the same result as transformers' sdpa;
and a packed batch of trees (no padding nodes in the forward): the same outputs and keys as the padded one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from specserve.kernels import cpu_attention
from specserve.kernels.grouped_attention import KERNEL_NAME, NAME, fold_mask, grouped_sdpa
from specserve.kernels.tree import PAD_TOKEN, DraftTree, chain_tree, stack_trees
from specserve.server.engine.target import TargetModel, load_model


class Attention(nn.Module):
    """What the attention functions read from a decoder's attention module."""

    def __init__(self, group: int, is_causal: bool = True) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = group, is_causal


def inputs(batch: int, heads: int, kv_heads: int, length: int, keys: int, mask_heads: int | None):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, 16, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, keys, 16, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, keys, 16, generator=generator, dtype=torch.float64)
    if mask_heads is None:
        return q, k, v, None
    allowed = torch.rand(batch, mask_heads, length, keys, generator=generator) < 0.7
    allowed[..., 0] = True  # every query sees at least one key
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    return q, k, v, mask


@pytest.mark.parametrize("batch,heads,kv_heads,length,mask_heads", [
    (3, 6, 2, 4, 1),  # a batch of 4-node trees: transformers repeats keys and values here
    (2, 6, 2, 1, 1),  # one query token: transformers folds too
    (2, 6, 3, 5, 6),  # a mask per query head
    (1, 4, 4, 3, 1),  # no grouping
    (1, 6, 2, 7, None),  # prefill: no mask, causal
])
def test_grouped_sdpa_matches_transformers_sdpa(batch, heads, kv_heads, length, mask_heads):
    q, k, v, mask = inputs(batch, heads, kv_heads, length, 7 if mask_heads is None else 11, mask_heads)
    module = Attention(heads // kv_heads)
    out, weights = grouped_sdpa(module, q, k, v, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert weights is None and out.shape == (batch, length, heads, 16)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_fold_mask_puts_each_query_head_at_its_group_row():
    mask = torch.arange(2 * 3 * 5, dtype=torch.float64).reshape(2, 1, 3, 5)
    folded = fold_mask(mask, kv_heads=2, group=2)
    assert folded.shape == (2, 1, 6, 5)
    assert torch.equal(folded[:, :, 3:], mask) and torch.equal(folded[:, :, :3], mask)  # each group member
    per_head = torch.randn(1, 4, 3, 5)
    # head 3 = kv head 1, group member 1: rows 3..5 of kv head 1
    assert torch.equal(fold_mask(per_head, kv_heads=2, group=2)[0, 1, 3:], per_head[0, 3])


def test_grouped_sdpa_refuses_a_softcap():
    q, k, v, mask = inputs(1, 4, 2, 2, 3, 1)
    with pytest.raises(ValueError, match="softcap"):
        grouped_sdpa(Attention(2), q, k, v, mask, softcap=30.0)


def test_a_packed_query_without_its_rows_is_refused():
    q, k, v, mask = inputs(2, 4, 2, 3, 5, 1)
    with pytest.raises(ValueError, match="packed_rows"):
        grouped_sdpa(Attention(2), q[:1], k, v, mask)


def test_load_model_uses_it_for_grouped_query_models_and_verify_matches(tiny_model_dir):
    grouped = TargetModel(load_model(str(tiny_model_dir), "float64", "cpu", attention="grouped"))
    stock = TargetModel(load_model(str(tiny_model_dir), "float64", "cpu", attention="sdpa"))
    default = load_model(str(tiny_model_dir), "float64", "cpu").model.config._attn_implementation
    assert default == (KERNEL_NAME if cpu_attention.available() else NAME)  # on SDPA for float64
    assert grouped.model.config._attn_implementation == NAME
    assert stock.model.config._attn_implementation == "sdpa"
    tree = chain_tree(torch.tensor([[5, 9, 3, 7], [2, 4, 6, 8]]))
    outputs = []
    for target in (grouped, stock):
        cache = target.new_cache(2, 32)
        first = target.embed_tokens(torch.tensor([[1, 5, 9, 11, 3]]))
        target.prefill(first[:, :3], cache, 0, 0)
        # a second chunk attends to the first: transformers must hand the function a mask here
        chunk = target.prefill(first[:, 3:], cache, 0, 3)
        target.prefill(target.embed_tokens(torch.tensor([[4, 4, 2]])), cache, 1, 0)
        outputs.append((chunk, target.verify(tree, cache, [0, 1], [5, 3]).logits))
    for mine, theirs in zip(*outputs):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_a_batch_of_trees_of_different_sizes_runs_packed_and_matches_the_padded_forward(tiny_model_dir):
    grouped = TargetModel(load_model(str(tiny_model_dir), "float64", "cpu"))
    stock = TargetModel(load_model(str(tiny_model_dir), "float64", "cpu", attention="sdpa"))
    assert grouped.packs and not stock.packs
    trees = [DraftTree.from_parents(torch.tensor([[5, 9, 3, 7]]), torch.tensor([[-1, 0, 0, 1]])),
             chain_tree(torch.tensor([[2]])), chain_tree(torch.tensor([[6, 1, 8]]))]
    tree = stack_trees(trees)
    real = tree.tokens != PAD_TOKEN
    results = []
    for target in (grouped, stock):
        cache = target.new_cache(3, 32)
        for slot, prompt in enumerate([[1, 5, 9, 11, 3], [4, 4, 2], [7, 3, 3, 1]]):
            target.prefill(target.embed_tokens(torch.tensor([prompt])), cache, slot, 0)
        out = target.verify(tree, cache, [0, 1, 2], [5, 3, 4])
        keys = torch.stack([cache.layers[0].keys[row, :, offset : offset + 4] for row, offset in enumerate([5, 3, 4])])
        results.append((out, cache.binding.packed, keys))
    (packed_out, packed, packed_keys), (padded_out, not_packed, padded_keys) = results
    assert not_packed is None and packed.tolist() == [0, 1, 2, 3, 4, 8, 9, 10]  # rows of 4 nodes: 4, 1 and 3 real
    assert len(packed) == 4 + 1 + 3 and packed_out.logits.shape == padded_out.logits.shape
    torch.testing.assert_close(packed_out.logits[real], padded_out.logits[real], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed_out.hidden[real], padded_out.hidden[real], rtol=1e-10, atol=1e-10)
    # every real node's keys land at its row's position, as the padded forward writes them
    torch.testing.assert_close(packed_keys.transpose(1, 2)[real], padded_keys.transpose(1, 2)[real],
                               rtol=1e-10, atol=1e-10)
