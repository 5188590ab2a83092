"""KV cache compaction after acceptance: keep the prefix, move the accepted path right after it.

Verifying a tree appends one KV row per node after the prefix, at slot prefix_len + node index.
The accepted path (root first) is scattered over those slots; the next forward needs it contiguous
at prefix_len, prefix_len + 1, ... in path order, and nothing after it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer


def compact_kv(
    tensor: Tensor,  # [B, H, S, D] keys or values; S >= prefix_len + number of tree nodes
    prefix_len: int,
    accepted_nodes: Tensor,  # [B, K] long node indices, root (0) first, no -1 padding
) -> Tensor:
    """[B, H, prefix_len + K, D]: the prefix, then the rows of the accepted nodes in path order.

    The rows are moved in place and the result is a view of `tensor`: only the K accepted rows are
    copied, never the prefix (copying the whole cache every step would cost as much as the cache).
    All rows of a batch keep the same K: a batch whose rows accepted different numbers of tokens
    must be compacted row by row (or the caller pads the shorter paths and masks those slots), since
    one tensor cannot hold ragged sequence lengths.

    Example (prefix_len 2, rows named by their slot; tree slots 2..6 hold nodes 0..4)::

        rows [p0, p1, n0, n1, n2, n3, n4], accepted_nodes [[0, 1, 4]] -> [p0, p1, n0, n1, n4]
    """
    batch, heads, _, dim = tensor.shape
    keep = accepted_nodes.shape[1]
    index = (prefix_len + accepted_nodes)[:, None, :, None].expand(batch, heads, -1, dim)
    # gather first (a copy), then write: a destination slot may be another row's source
    tensor[:, :, prefix_len : prefix_len + keep] = tensor.gather(2, index)
    return tensor[:, :, : prefix_len + keep]


def compact_cache(cache: DynamicCache, prefix_len: int, accepted_nodes: Tensor) -> None:
    """Apply `compact_kv` in place to every layer of a transformers `DynamicCache`.

    accepted_nodes: [B, K] as for `compact_kv` (e.g. `AcceptResult.accepted_nodes[:, :n + 1]`); the
    caller slices off the -1 padding (checking it here would cost a host sync every step).
    Afterwards `cache.get_seq_length() == prefix_len + K`, ready for the next forward. The layers'
    tensors are replaced rather than cropped: in transformers 5.x `crop` takes only a negative count
    of tokens to drop, which cannot express "keep these scattered rows".
    Only full-attention `DynamicLayer`s are supported; sliding-window and linear-attention layers
    keep extra state that a row gather would corrupt, so they raise TypeError.
    """
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"compact_cache supports DynamicLayer only, got {type(layer).__name__}")
        if layer.is_initialized and layer.keys.numel() > 0:
            layer.keys = compact_kv(layer.keys, prefix_len, accepted_nodes)
            layer.values = compact_kv(layer.values, prefix_len, accepted_nodes)


def compact_rows(
    tensor: Tensor,  # [B, H, S, D] keys or values of a batch of sequences, each at its own offset
    prefix_lens: Tensor,  # [B] long, tokens each row had cached before its tree
    accepted_nodes: Tensor,  # [B, K] long, root (0) first, -1 after a row's accepted path
) -> None:
    """Per-row `compact_kv`, in place: row b's accepted path moves to prefix_lens[b], prefix_lens[b] + 1, ...

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
