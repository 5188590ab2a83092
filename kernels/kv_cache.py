"""KV cache compaction after acceptance: keep the prefix, move the accepted path right after it.

Verifying a tree appends one KV row per node after the prefix, at slot prefix_len + node index.
The accepted path (root first) is scattered over those slots; the next forward needs it contiguous
at prefix_len, prefix_len + 1, ... in path order. Only the accepted rows are copied, never the
prefix (copying the whole cache every step would cost as much as the cache).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compact_rows(
    tensor: Tensor,  # [B, H, S, D] keys or values of a batch of sequences, each at its own offset
    prefix_lens: Tensor,  # [B] long, tokens each row had cached before its tree
    accepted_nodes: Tensor,  # [B, K] long, root (0) first, -1 after a row's accepted path
) -> None:
    """In place: row b's accepted path moves to prefix_lens[b], prefix_lens[b] + 1, ...

    Rows accept paths of different lengths, so the -1 padding is kept and turned into harmless
    writes: a padded column j copies slot prefix_lens[b] + j onto itself. Those slots lie past the
    row's new length, so whatever they hold is never attended to. Gather first (a copy), then
    scatter: a destination slot may be another node's source.

    Example (one row, prefix 2; tree slots 2..6 hold nodes 0..4), accepted_nodes [[0, 3, -1]]:
        rows [p0, p1, n0, n1, n2, n3, n4] -> [p0, p1, n0, n3, n2, n3, n4]; the new length is 4
    """
    batch, heads, _, dim = tensor.shape
    columns = torch.arange(accepted_nodes.shape[1], device=tensor.device)
    nodes = torch.where(accepted_nodes >= 0, accepted_nodes, columns)  # padding: copy onto itself
    source = (prefix_lens[:, None] + nodes)[:, None, :, None].expand(batch, heads, -1, dim)
    target = (prefix_lens[:, None] + columns)[:, None, :, None].expand(batch, heads, -1, dim)
    tensor.scatter_(2, target, tensor.gather(2, source))
