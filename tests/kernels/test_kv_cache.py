import torch
from transformers import DynamicCache

from specserve.kernels.kv_cache import compact_rows
from specserve.kernels.tree import DraftTree

PREFIX_LEN = 6


def verify_tree(model, prefix: torch.Tensor, tree: DraftTree) -> torch.Tensor:
    """Prefill the prefix, then score the tree in one forward: tree logits [B, N, V]."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prefix, cache=cache)
        out = model(
            tree.tokens, cache=cache, position_ids=tree.position_ids(prefix.shape[1]),
            attention_mask=tree.attention_mask(prefix.shape[1], torch.float64),
        )
    return out.logits


def example_batch() -> tuple[torch.Tensor, DraftTree]:
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 64, (2, PREFIX_LEN), generator=gen)
    tokens = torch.randint(0, 64, (2, 5), generator=gen)
    # row 0: 0 -> {1, 2}, 1 -> {3, 4}; row 1: 0 -> {1, 4}, 1 -> 2 -> 3
    parents = torch.tensor([[-1, 0, 0, 1, 1], [-1, 0, 1, 2, 0]])
    return prefix, DraftTree.from_parents(tokens, parents)


def test_tree_attention_is_exact(attention_llama, exact_to):
    model = attention_llama
    prefix, tree = example_batch()
    logits = verify_tree(model, prefix, tree)
    with torch.no_grad():
        for b in range(2):
            for node in range(5):
                path = tree.ancestors[b, node].nonzero()[:, 0]  # ancestors come before descendants
                plain = model(torch.cat([prefix[b], tree.tokens[b, path]])[None]).logits[0, -1]
                torch.testing.assert_close(logits[b, node], plain, rtol=0, atol=exact_to(model))


def test_compact_rows_docstring_example_and_ragged_rows():
    """The engine's slot cache runs this on every layer (tests/kernels/test_slot_cache.py checks the
    model-level result)."""
    # slot values stand for the rows: 10, 11 prefix; 20.. tree nodes; row 1 has prefix 1
    rows = torch.tensor([[10, 11, 20, 21, 22, 23, 24], [10, 30, 31, 32, 33, 34, 35]], dtype=torch.float64)
    tensor = rows[:, None, :, None].clone()  # [B=2, H=1, S=7, D=1]
    compact_rows(tensor, torch.tensor([2, 1]), torch.tensor([[0, 3, -1], [0, 2, 4]]))
    assert tensor[0, 0, :, 0].tolist() == [10, 11, 20, 23, 22, 23, 24]  # length 4 now
    assert tensor[1, 0, :4, 0].tolist() == [10, 30, 32, 34]  # length 4 now
