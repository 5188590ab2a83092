import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer

from specserve.kernels.kv_cache import compact_cache, compact_kv, compact_rows
from specserve.kernels.tree import DraftTree

PREFIX_LEN = 6


def named_rows(batch: int, rows: int) -> torch.Tensor:
    """[B, H=2, S, D=1] where row s of batch b holds 100 * b + s (both heads), so gathers are readable."""
    values = 100 * torch.arange(batch)[:, None] + torch.arange(rows)
    return values[:, None, :, None].expand(batch, 2, rows, 1).float()


def test_compact_kv_worked_example():
    # prefix_len 2; slots 2..6 hold tree nodes 0..4; row 0 keeps nodes 0, 1, 4 and row 1 keeps 0, 3, 2.
    out = compact_kv(named_rows(2, 7), prefix_len=2, accepted_nodes=torch.tensor([[0, 1, 4], [0, 3, 2]]))
    assert out.shape == (2, 2, 5, 1)
    assert out[:, 0, :, 0].tolist() == [[0, 1, 2, 3, 6], [100, 101, 102, 105, 104]]
    assert torch.equal(out[:, 0], out[:, 1])


def test_compact_kv_copies_no_prefix_rows():
    rows = named_rows(1, 7)
    out = compact_kv(rows, prefix_len=2, accepted_nodes=torch.tensor([[0, 2]]))
    assert out.data_ptr() == rows.data_ptr()  # a view: the prefix was not copied
    assert out[0, 0, :, 0].tolist() == [0, 1, 2, 4]


def test_compact_cache_rejects_sliding_layers():
    sliding = DynamicCache()
    sliding.layers = [DynamicSlidingWindowLayer(sliding_window=16)]
    with pytest.raises(TypeError, match="DynamicSlidingWindowLayer"):
        compact_cache(sliding, 2, torch.tensor([[0]]))


def tiny_llama(attn_implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    assert model.config._attn_implementation == attn_implementation
    return model


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_llama(request.param)


def exact_to(model) -> float:
    """The tolerance of "exact" for this float64 model: transformers' eager attention takes its
    softmax in float32 (`softmax(..., dtype=torch.float32)`), so eager agrees to float32 precision
    only; sdpa stays in float64."""
    return 1e-6 if model.config._attn_implementation == "eager" else 1e-9


def verify_tree(model, prefix: torch.Tensor, tree: DraftTree):
    """Prefill the prefix, then score the tree in one forward: (cache, tree logits [B, N, V])."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prefix, past_key_values=cache)
        out = model(
            tree.tokens, past_key_values=cache, position_ids=tree.position_ids(prefix.shape[1]),
            attention_mask=tree.attention_mask(prefix.shape[1], torch.float64),
        )
    return cache, out.logits


def example_batch() -> tuple[torch.Tensor, DraftTree]:
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 64, (2, PREFIX_LEN), generator=gen)
    tokens = torch.randint(0, 64, (2, 5), generator=gen)
    # row 0: 0 -> {1, 2}, 1 -> {3, 4}; row 1: 0 -> {1, 4}, 1 -> 2 -> 3
    parents = torch.tensor([[-1, 0, 0, 1, 1], [-1, 0, 1, 2, 0]])
    return prefix, DraftTree.from_parents(tokens, parents)


def test_tree_attention_is_exact(model):
    prefix, tree = example_batch()
    _, logits = verify_tree(model, prefix, tree)
    with torch.no_grad():
        for b in range(2):
            for node in range(5):
                path = tree.ancestors[b, node].nonzero()[:, 0]  # ancestors come before descendants
                plain = model(torch.cat([prefix[b], tree.tokens[b, path]])[None]).logits[0, -1]
                torch.testing.assert_close(logits[b, node], plain, rtol=0, atol=exact_to(model))


def test_compacted_cache_continues_like_a_fresh_prefill(model):
    prefix, tree = example_batch()
    cache, _ = verify_tree(model, prefix, tree)
    accepted = torch.tensor([[0, 1, 4], [0, 1, 2]])  # one path per row, both of length 3
    compact_cache(cache, PREFIX_LEN, accepted)
    assert cache.get_seq_length() == PREFIX_LEN + 3
    next_token = torch.tensor([[5], [9]])
    with torch.no_grad():
        step = model(next_token, past_key_values=cache, position_ids=torch.full((2, 1), PREFIX_LEN + 3))
        fresh = model(torch.cat([prefix, tree.tokens.gather(1, accepted), next_token], dim=1))
    torch.testing.assert_close(step.logits[:, -1], fresh.logits[:, -1], rtol=0, atol=exact_to(model))
    assert cache.get_seq_length() == PREFIX_LEN + 4


def test_compact_rows_docstring_example_and_ragged_rows():
    # slot values stand for the rows: 10, 11 prefix; 20.. tree nodes; row 1 has prefix 1
    rows = torch.tensor([[10, 11, 20, 21, 22, 23, 24], [10, 30, 31, 32, 33, 34, 35]], dtype=torch.float64)
    tensor = rows[:, None, :, None].clone()  # [B=2, H=1, S=7, D=1]
    compact_rows(tensor, torch.tensor([2, 1]), torch.tensor([[0, 3, -1], [0, 2, 4]]))
    assert tensor[0, 0, :, 0].tolist() == [10, 11, 20, 23, 22, 23, 24]  # length 4 now
    assert tensor[1, 0, :4, 0].tolist() == [10, 30, 32, 34]  # length 4 now
