"""Shared builders for the kernels tests."""

import pytest
import torch

from specserve.kernels.tree import PAD_TOKEN, DraftTree


def _random_tree(batch: int, nodes: int, vocab: int, seed: int, max_padding: int = 0) -> DraftTree:
    """Random topologically ordered trees; each row ends with 0..max_padding padding nodes."""
    gen = torch.Generator().manual_seed(seed)
    # parents[i] uniform in [0, i): floor(u * i) for i >= 1.
    index = torch.arange(nodes)
    parents = (torch.rand(batch, nodes, generator=gen) * index).long()
    parents[:, 0] = -1
    tokens = torch.randint(0, vocab, (batch, nodes), generator=gen)
    num_padding = torch.randint(0, max_padding + 1, (batch, 1), generator=gen)
    padding = (index >= nodes - num_padding) & (index > 0)
    tokens[padding] = PAD_TOKEN
    parents[padding] = 0
    # Real nodes must not hang below padding nodes: those come last, so only real parents are used.
    return DraftTree.from_parents(tokens, parents)


@pytest.fixture
def random_tree():
    """Factory: random_tree(batch, nodes, vocab, seed, max_padding=0) -> DraftTree."""
    return _random_tree
