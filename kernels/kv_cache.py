"""KV caches for many sequences at once: the slot cache, and compaction of accepted tree rows.

## The slot cache

The engine's target and the model drafters (an EAGLE/MSD head, a draft LM) each keep one: sequence
i owns slot i of every cache. Per layer the cache holds keys and values of shape
[num_slots, H, capacity, D], allocated at the first forward (so shapes do not change from step to
step). Before a forward the caller binds the rows it runs
(`bind(rows, offsets, new_tokens)`): slot indices and the tokens each slot already holds. Each layer
then writes every row's new tokens at that row's own offset and hands attention the rows' keys and
values up to the widest row; the per-row 4D mask (`DraftTree.attention_mask` with per-row prefixes)
hides what lies past each row's own length. Rows bound as a contiguous range are returned as views,
other sets as one gather.

Example: rows [0, 2] with offsets [5, 3] and a tree of 4 nodes write slot 0 at positions 5..8 and
slot 2 at 3..6, and attention sees keys [2, H, 9, D] (width = max offset + 4).

A *packed* binding (`bind(..., packed=...)`, `DraftTree.packing`) is for a batch of trees of
different sizes: the forward carries only the real nodes, one row [1, T] with no padding, so its
linear layers do no work for padding. Each layer writes token t at its own row and position (padding
positions keep what they held: the mask hides them) and still hands attention the rows' padded keys
[B, H, width, D]; the attention function attends row by row (`grouped_attention.grouped_sdpa`).

This is a transformers `Cache`, so the stock model forward runs on it unchanged. Sliding-window
layers keep every row too, as full-attention ones do, and report themselves as full layers (so the
model's own masks index keys by their absolute cache position): no rolling buffer, since compaction
gathers rows by position and every layer of a forward shares one binding. Their masks hide the rows
past the window instead (`kernels.tree.LayerMasks`; the decoder's own sliding mask in a causal prefill
chunk), so a context longer than the window is served exactly, at full attention's memory.

## Compaction

Verifying a tree appends one KV row per node after the prefix, at slot prefix_len + node index.
The accepted path (root first) is scattered over those slots; the next forward needs it contiguous
at prefix_len, prefix_len + 1, ... in path order. Only the accepted rows are copied, never the
prefix (copying the whole cache every step would cost as much as the cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin


def head_dim(config) -> int:
    """The attention head size of a transformers text `config` (its own `head_dim` where it has one)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one cached token takes over all decoder layers of a transformers
    `config` whose activations are `dtype`."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim(config) * dtype.itemsize


@dataclass(frozen=True)
class Binding:
    """The rows of the next forward: slot indices, their cached lengths, and the key width."""

    rows: Tensor  # [B] long slot indices
    offsets: Tensor  # [B] long tokens already cached per row
    positions: Tensor  # [B, new tokens] long: where each row's new tokens go
    row_list: list[int]  # the same two, on the host
    offset_list: list[int]
    width: int  # max(offsets) + new tokens: the key length attention sees
    start: int | None  # first slot if the rows are a contiguous ascending range (then views, no copy)
    packed: Tensor | None = None  # [T] long: which of the B x new tokens the forward carries (`Packing.index`)

    @cached_property
    def packed_places(self) -> tuple[Tensor, Tensor]:
        """The slot and the position of each token a packed forward carries: worked out once per forward
        (here, at the first layer), then read by every layer."""
        return self.rows.repeat_interleave(self.positions.shape[1])[self.packed], self.positions.flatten()[self.packed]


class SlotLayer(CacheLayerMixin):
    """One decoder layer's slots; reads the current `Binding` from its `SlotCache`."""

    is_sliding = False

    def __init__(self, cache: SlotCache) -> None:
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        # zeros, not empty: a batch row attends over the widest row's width, and the masked positions
        # past its own length must hold finite numbers (a masked weight of 0 times a NaN is NaN)
        _, heads, _, dim = key_states.shape
        shape = (self.cache.num_slots, heads, self.cache.capacity, dim)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write the rows' new keys/values [B, H, N, D] at their offsets; return [B, H, width, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        bound = self.cache.binding
        if bound.packed is not None:  # a packed batch [1, H, T, D]: token t goes to its row at its position
            slots, positions = bound.packed_places
            index = (slots, slice(None), positions)
            self.keys[index] = key_states[0].transpose(0, 1)
            self.values[index] = value_states[0].transpose(0, 1)
        elif len(bound.row_list) == 1:  # one row (a prefill chunk, a lone sequence): a slice copy
            row, offset, new = bound.row_list[0], bound.offset_list[0], key_states.shape[2]
            self.keys[row, :, offset : offset + new].copy_(key_states[0])
            self.values[row, :, offset : offset + new].copy_(value_states[0])
        else:  # a batch: one indexed write per tensor ([B, N, H, D] at rows x positions), the new rows only
            index = (bound.rows[:, None], slice(None), bound.positions)
            self.keys[index] = key_states.transpose(1, 2)
            self.values[index] = value_states.transpose(1, 2)
        return self.rows(self.keys), self.rows(self.values)

    def rows(self, tensor: Tensor) -> Tensor:
        bound = self.cache.binding
        if bound.start is not None:
            return tensor[bound.start : bound.start + len(bound.rows), :, : bound.width]
        return tensor[:, :, : bound.width].index_select(0, bound.rows)  # copies the bound width only

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.binding.width, 0

    def get_seq_length(self) -> int:
        return self.cache.binding.width - self.cache.new_tokens

    def get_max_length(self) -> int:
        return self.cache.capacity


class SlotCache(Cache):
    """`num_slots` sequences of up to `capacity` tokens each, for every decoder layer."""

    def __init__(self, num_layers: int, num_slots: int, capacity: int, device: torch.device) -> None:
        self.num_slots, self.capacity, self.device = num_slots, capacity, device
        zero = torch.zeros(1, dtype=torch.long)
        self.binding = Binding(zero, zero, zero[:, None], [0], [0], 0, 0)
        self.new_tokens = 0
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    def bind(self, rows: list[int], offsets: list[int], new_tokens: int, packed: Tensor | None = None) -> Tensor:
        """Make the next forward run slots `rows`, each after its `offsets` cached tokens, with
        `new_tokens` new tokens per row; `packed` (`Packing.index`): the forward carries only these of the
        rows' B x new_tokens tokens, as one row. Returns the offsets as a tensor (for masks and positions)."""
        if max(offsets) + new_tokens > self.capacity:
            raise ValueError(f"a sequence would exceed the KV slot capacity of {self.capacity} tokens")
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        offsets_t = torch.tensor(offsets, dtype=torch.long, device=self.device)
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        positions = offsets_t[:, None] + torch.arange(new_tokens, device=self.device)
        self.binding = Binding(rows_t, offsets_t, positions, list(rows), list(offsets), max(offsets) + new_tokens,
                               rows[0] if contiguous else None, packed)
        self.new_tokens = new_tokens
        return offsets_t

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cached tokens of slot `source` into slot `target` (prefix caching)."""
        for layer in self.layers:
            if layer.is_initialized:
                for tensor in (layer.keys, layer.values):
                    tensor[target, :, :length].copy_(tensor[source, :, :length])

    def compact(self, accepted_nodes: Tensor) -> None:
        """After a verify forward of the bound rows: move each row's accepted path (root first, -1
        padded, [B, K]) right after its prefix. The caller then counts the new lengths."""
        bound = self.binding
        for layer in self.layers:
            for tensor in (layer.keys, layer.values):
                window = tensor[:, :, : bound.width]  # a view: only the bound width is touched
                if bound.start is not None:
                    compact_rows(window[bound.start : bound.start + len(bound.rows)], bound.offsets, accepted_nodes)
                else:  # gather the rows, compact them, write them back
                    rows = window.index_select(0, bound.rows)
                    compact_rows(rows, bound.offsets, accepted_nodes)
                    window.index_copy_(0, bound.rows, rows)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))

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
