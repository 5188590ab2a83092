"""Bidirectional blocks of a prompt: spans whose tokens attend to each other both ways in prefill.

Some vision-language models (Gemma 3) let the tokens of one image see each other in both directions
while the rest of the prompt stays causal. A prompt's blocks are given per token as `blocks` [L]
long: the block's id (0, 1, ...) at its tokens, -1 elsewhere. Two pure functions serve chunked
prefill: `chunk_end` moves a chunk's end out of a block (a block cut in two would leave its first
part blind to the rest, since the first chunk's KV is written before the second exists), and
`prefill_mask` is the mask of one chunk, causal plus its blocks.

Example (7 tokens, one block at 2..4, a chunk of tokens 2..6 after 2 cached ones):
    blocks     -1 -1 | 0 0 0 -1 -1
    query 2:   1 1 | 1 1 1 0 0      the block's tokens see the whole block
    query 4:   1 1 | 1 1 1 0 0
    query 5:   1 1 | 1 1 1 1 0      outside a block: causal
A chunk asked to end at 4 (inside the block) ends at 2 (its start) or, if it starts at 2, at 5.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tree import additive_mask


def chunk_end(blocks: Tensor, start: int, end: int) -> int:
    """Where a prefill chunk [start, end) of a prompt with `blocks` [L] should end instead: `end` when
    it does not cut a block, else the block's start (the chunk stops before it) or, when the chunk
    begins with that block, the block's end (the chunk takes the whole block, past `end`)."""
    length = blocks.shape[0]
    if end >= length or end <= start:
        return min(end, length)
    block = int(blocks[end])
    if block < 0 or int(blocks[end - 1]) != block:
        return end
    members = (blocks == block).nonzero()[:, 0]
    first, last = int(members[0]), int(members[-1]) + 1
    return first if first > start else last


def prefill_mask(blocks: Tensor, offset: int, dtype: torch.dtype, window: int | None = None) -> Tensor:
    """Additive mask [1, 1, n, offset + n] of a prefill chunk of n tokens after `offset` cached ones,
    `blocks` [n] the chunk's own block ids (a chunk holds whole blocks, `chunk_end`): each token sees
    every cached token, the chunk's tokens up to itself, and all of its own block.

    `window`: a sliding-window layer's mask, which also hides every key `window` or more tokens before
    the query, in its block or not (Gemma 3's sliding layers: window AND (causal OR block)); later
    tokens of its block stay visible. In the example with window 2, query 2 sees 1..4, query 4 sees
    3 and 4 (not its block's first token), query 5 sees 4 and 5."""
    n = blocks.shape[0]
    queries = torch.arange(offset, offset + n, device=blocks.device)
    keys = torch.arange(offset + n, device=blocks.device)
    allowed = keys[None, :] <= queries[:, None]  # [n, offset + n]: every cached token, the chunk up to itself
    allowed[:, offset:] |= (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0)  # the own block
    if window is not None:
        allowed &= keys[None, :] > queries[:, None] - window
    return additive_mask(allowed, dtype)
