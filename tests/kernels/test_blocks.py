"""Bidirectional blocks: where a prefill chunk may end, and a chunk's mask, on literal cases."""

from __future__ import annotations

import pytest
import torch

from specserve.kernels.blocks import chunk_end, prefill_mask

# text, text, a block of 3, text, a block of 2 (adjacent blocks have different ids)
BLOCKS = torch.tensor([-1, -1, 0, 0, 0, -1, 1, 1])


@pytest.mark.parametrize("start, end, expected", [
    (0, 2, 2),  # ends before the block
    (0, 3, 2),  # would cut the block: stops before it
    (0, 4, 2),
    (0, 5, 5),  # ends right after the block
    (2, 3, 5),  # starts with the block: takes all of it, past the asked end
    (2, 4, 5),
    (5, 7, 6),  # would cut the second block
    (6, 7, 8),
    (5, 8, 8),  # the prompt's end
    (5, 12, 8),  # asked past the prompt
])
def test_chunk_end(start, end, expected):
    assert chunk_end(BLOCKS, start, end) == expected


def test_chunk_end_without_blocks_keeps_the_end():
    assert chunk_end(torch.full((6,), -1), 1, 4) == 4


def test_prefill_mask_example():
    """The module docstring's example: a chunk of 5 tokens (a block of 3, then 2 text tokens) after 2
    cached ones."""
    mask = prefill_mask(torch.tensor([0, 0, 0, -1, -1]), 2, torch.float32)
    assert mask.shape == (1, 1, 5, 7)
    assert (mask[0, 0] == 0).int().tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert mask.min() == torch.finfo(torch.float32).min


def test_prefill_mask_without_blocks_is_causal():
    mask = prefill_mask(torch.tensor([-1, -1, -1]), 1, torch.float64)
    assert (mask[0, 0] == 0).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_prefill_mask_keeps_blocks_apart():
    # two adjacent blocks: each sees itself both ways, the second sees the first causally
    mask = prefill_mask(torch.tensor([0, 0, 1, 1]), 0, torch.float32)
    assert (mask[0, 0] == 0).int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
