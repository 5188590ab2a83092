"""The slot cache under a real model: rows at different lengths verify trees in one forward, compact
their ragged accepted paths, and continue exactly like a fresh forward over each row's text."""

from __future__ import annotations

import pytest
import torch

from specserve.kernels.kv_cache import SlotCache
from specserve.kernels.tree import DraftTree, chain_tree


def forward(model, cache: SlotCache, tree: DraftTree, slots: list[int], prefix_lens: list[int]) -> torch.Tensor:
    offsets = cache.bind(slots, prefix_lens, tree.num_nodes)
    with torch.no_grad():
        return model(tree.tokens, cache=cache, position_ids=tree.position_ids(offsets),
                     attention_mask=tree.attention_mask(offsets, torch.float64, cache.binding.width)).logits


@pytest.mark.parametrize("slots", [[0, 1], [2, 0]], ids=["contiguous", "gathered"])
def test_ragged_rows_verify_compact_and_continue_like_a_fresh_forward(attention_llama, exact_to, slots):
    model = attention_llama
    gen = torch.Generator().manual_seed(1)
    prefixes = [torch.randint(0, 64, (n,), generator=gen) for n in (6, 3)]  # rows at different lengths
    cache = SlotCache(model.config.num_hidden_layers, num_slots=3, capacity=32, device=torch.device("cpu"))
    for slot, prefix in zip(slots, prefixes):
        forward(model, cache, chain_tree(prefix[None]), [slot], [0])  # prefill = a chain after nothing
    # row 0: 0 -> {1, 2}, 1 -> {3, 4}; row 1: 0 -> {1, 4}, 1 -> 2 -> 3
    tree = DraftTree.from_parents(torch.randint(0, 64, (2, 5), generator=gen),
                                  torch.tensor([[-1, 0, 0, 1, 1], [-1, 0, 1, 2, 0]]))
    lengths = [len(p) for p in prefixes]
    forward(model, cache, tree, slots, lengths)
    accepted = torch.tensor([[0, 1, 4], [0, 4, -1]])  # paths of 3 and 2 nodes
    cache.compact(accepted)
    kept = [tree.tokens[0, [0, 1, 4]], tree.tokens[1, [0, 4]]]
    following = torch.tensor([[5], [9]])
    logits = forward(model, cache, chain_tree(following), slots, [lengths[0] + 3, lengths[1] + 2])
    with torch.no_grad():
        for row in range(2):
            text = torch.cat([prefixes[row], kept[row], following[row]])[None]
            fresh = model(text).logits[0, -1]
            torch.testing.assert_close(logits[row, -1], fresh, rtol=0, atol=exact_to(model))


def test_a_copied_prefix_continues_like_the_slot_it_came_from(attention_llama, exact_to):
    model = attention_llama
    prefix = torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(2))
    cache = SlotCache(model.config.num_hidden_layers, num_slots=2, capacity=32, device=torch.device("cpu"))
    forward(model, cache, chain_tree(prefix[None]), [0], [0])
    forward(model, cache, chain_tree(torch.tensor([[9, 9, 9]])), [1], [0])  # slot 1 holds other tokens
    cache.copy_prefix(0, 1, 5)  # the first 5 of slot 0's 7 rows
    layer = cache.layers[0]
    assert torch.equal(layer.keys[1, :, :5], layer.keys[0, :, :5])
    assert not torch.equal(layer.keys[1, :, 5:7], layer.keys[0, :, 5:7])  # the rest is untouched
    following = torch.tensor([[3, 4]])
    copied = forward(model, cache, chain_tree(following), [1], [5])
    with torch.no_grad():
        fresh = model(torch.cat([prefix[:5], following[0]])[None]).logits[:, 5:]
    torch.testing.assert_close(copied, fresh, rtol=0, atol=exact_to(model))
