"""Triton kernels against the torch reference, on CPU through the Triton interpreter.

Not collected by a normal run (the name does not start with test_): `test_triton_acceptance.py`
runs this file in a fresh process with TRITON_INTERPRET=1 in its environment. The variable must be
set before triton is imported anywhere (`triton.jit` reads it when decorating, and torch._dynamo,
pulled in by transformers, imports triton early), which only a new process guarantees.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through test_triton_acceptance.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

from specserve.kernels import acceptance, triton_acceptance  # noqa: E402
from specserve.kernels.sampling import random_exponential, random_uniform  # noqa: E402
from specserve.kernels.tree import DraftTree  # noqa: E402

CPU = torch.device("cpu")


def assert_same(expected, actual) -> None:
    assert torch.equal(expected.accepted_nodes, actual.accepted_nodes)
    assert torch.equal(expected.num_accepted, actual.num_accepted)
    assert torch.equal(expected.emitted_tokens, actual.emitted_tokens)


def use_block_v(monkeypatch, block_v: int) -> None:
    """Small vocabulary chunks make the kernels' chunk loops take several steps."""
    monkeypatch.setattr(triton_acceptance, "_MAX_BLOCK_V", block_v)


@pytest.mark.parametrize(("dtype", "block_v"), [(torch.float32, 1024), (torch.float64, 4), (torch.bfloat16, 4)])
def test_greedy_kernel_matches_torch(random_tree, monkeypatch, dtype, block_v):
    use_block_v(monkeypatch, block_v)
    trees = random_tree(batch=6, nodes=9, vocab=3, seed=1, max_padding=2)
    logits = torch.randn(6, 9, 11, generator=torch.Generator().manual_seed(2)).to(dtype)
    logits[..., 3:] -= 1.0  # favour the tree's tokens 0..2 so that paths get accepted
    expected = acceptance.greedy_accept(trees, logits)
    assert expected.num_accepted.max() >= 2  # the comparison covers real walks
    assert_same(expected, triton_acceptance.greedy_accept(trees, logits))


def test_greedy_kernel_worked_examples():
    # row 0: the acceptance docstring's example; row 1: equally deep matches 3 and 4, node 3 wins.
    trees = DraftTree.from_parents(
        torch.tensor([[7, 3, 9, 4, 5], [0, 5, 5, 6, 6]]), torch.tensor([[-1, 0, 0, 1, 1], [-1, 0, 0, 2, 1]])
    )
    logits = torch.zeros(2, 5, 10)
    argmax = torch.tensor([[3, 5, 1, 8, 2], [5, 6, 6, 1, 2]])
    logits.scatter_(2, argmax[..., None], 1.0)
    result = triton_acceptance.greedy_accept(trees, logits)
    assert result.accepted_nodes.tolist() == [[0, 1, 4], [0, 2, 3]]
    assert result.emitted_tokens.tolist() == [[3, 5, 2], [5, 6, 1]]


@pytest.mark.parametrize(("dtype", "block_v"), [(torch.float32, 4), (torch.float64, 1024)])
def test_sample_kernel_matches_torch(random_tree, monkeypatch, dtype, block_v):
    use_block_v(monkeypatch, block_v)
    vocab = 6
    gen = torch.Generator().manual_seed(3)
    for seed in range(2):
        trees = random_tree(batch=5, nodes=8, vocab=3, seed=10 + seed, max_padding=2)
        logits = torch.randn(5, 8, vocab, generator=gen, dtype=dtype)
        logits[..., 3:] -= 2.0  # mass on the tree's tokens: acceptance happens
        logits[0, :, 2] = -torch.inf  # a zero-probability token in row 0
        probs = torch.softmax(logits, dim=-1)
        accept_u = random_uniform((5, trees.max_depth, 8), gen, CPU)
        noise = random_exponential((5, vocab), gen, CPU)
        expected = acceptance.tree_sample_accept_given_noise(trees, probs, accept_u, noise)
        assert expected.num_accepted.sum() > 0  # the comparison covers real walks
        assert_same(expected, triton_acceptance.tree_sample_accept_given_noise(trees, probs, accept_u, noise))


def test_sample_kernel_handles_duplicates_and_padding():
    # 0 -> {1: tok 2, 2: tok 2, 3: padding, 4: tok 1}; root mass only on token 2 and on token 0
    trees = DraftTree.from_parents(torch.tensor([[0, 2, 2, -1, 1]]), torch.tensor([[-1, 0, 0, 0, 0]]))
    probs = torch.tensor([[[0.5, 0.0, 0.5, 0.0]] * 5])
    accept_u = torch.tensor([[[0.0, 0.9, 0.0, 0.0, 0.0]]])  # reject node 1; node 2 and padding must not win
    noise = torch.ones(1, 4)
    result = triton_acceptance.tree_sample_accept_given_noise(trees, probs, accept_u, noise)
    assert result.accepted_nodes.tolist() == [[0, -1]]
    assert result.emitted_tokens.tolist() == [[0, -1]]  # recovered: token 2 was zeroed
    assert_same(acceptance.tree_sample_accept_given_noise(trees, probs, accept_u, noise), result)
