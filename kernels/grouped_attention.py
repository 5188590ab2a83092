"""Grouped-query attention that reads each key/value head once, for verifying many tokens.

A grouped-query model (SmolLM2: 9 query heads on 3 key/value heads) shares each key/value head
among a group of query heads. transformers' `sdpa` attention handles one query token by folding the
group into the query length, but for several query tokens with a mask (every tree verification) it
copies each key/value head once per group member (`repeat_kv`) and attends over the copies.

`grouped_sdpa` folds in every case: query [B, H, N, D] becomes [B, KVH, group * N, D], the mask is
repeated for each member of the group, and one scaled-dot-product call reads the keys and values
once. Each (query, key) pair meets the same numbers as before; `benchmarks/profile_step.py
--attention sdpa grouped` measures the difference on a whole model.

It also runs *packed* batches (`kv_cache` module docstring): given `packed_rows` (the forward's
kwarg: each row's real nodes and cached tokens, `DraftTree.packing`), the query [1, H, T, D] holds
row after row only the real nodes of a batch of trees, and each row attends on its own, over its own
keys only (no padding queries, no keys past its own length). A row costs one SDPA call, so a batch
of equal trees, which has no padding, runs batched as above.

`grouped_kernel` is the same with the few-token calls on the CPU (decoding, tree verification, packed
or not) sent to `cpu_attention`'s kernel instead of SDPA; every other call goes to `grouped_sdpa`.

Both are registered with transformers' `AttentionInterface` (`target.load_model`), so no model code is
forked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from . import cpu_attention

NAME = "specserve_grouped_sdpa"
KERNEL_NAME = "specserve_grouped_cpu_kernel"
NAMES = (NAME, KERNEL_NAME)


def grouped_sdpa(
    module: nn.Module,
    query: Tensor,  # [B, H, N, D]
    key: Tensor,  # [B, KVH, S, D]
    value: Tensor,  # [B, KVH, S, D]
    attention_mask: Tensor | None,  # additive or bool, [B or 1, 1 or H, N, S]; None: causal or full
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    packed_rows: tuple[tuple[int, int], ...] | None = None,  # (real nodes, cached tokens) per row: a packed query
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract: returns ([B, N, H, D], no weights); [1, T, H, D] for a
    packed query (module docstring)."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError("grouped_sdpa does not take a softcap or a position bias")
    if packed_rows is None and query.shape[0] != key.shape[0]:  # SDPA would broadcast the one query row
        raise ValueError("a packed query reached grouped_sdpa without `packed_rows`: this decoder does not pass "
                         "its forward's keyword arguments on to attention")
    if packed_rows is not None:
        outs, start = [], 0
        for row, (nodes, cached) in enumerate(packed_rows):
            keys = slice(row, row + 1), slice(None), slice(None, cached + nodes)
            out, _ = grouped_sdpa(module, query[:, :, start : start + nodes], key[keys], value[keys],
                                  attention_mask[row : row + 1, :, :nodes, : cached + nodes], dropout, scaling,
                                  is_causal=False)
            outs.append(out)
            start += nodes
        return torch.cat(outs, dim=1), None
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(length > 1 and attention_mask is None and causal)
    if causal or group == 1:  # a causal mask cannot be folded; SDPA's own GQA handles this case
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling, is_causal=causal, enable_gqa=group > 1)
        return out.transpose(1, 2).contiguous(), None
    folded = query.reshape(batch, kv_heads, group * length, dim)
    if attention_mask is not None:
        attention_mask = fold_mask(attention_mask, kv_heads, group)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def grouped_kernel(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    packed_rows: tuple[tuple[int, int], ...] | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """`grouped_sdpa`'s contract; a call `cpu_attention.fits` runs on its kernel."""
    tokens = query.shape[2] if packed_rows is None else max(nodes for nodes, _ in packed_rows)
    if (dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and (packed_rows is not None or query.shape[0] == key.shape[0])
            and cpu_attention.fits(query, key, attention_mask, tokens)):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return cpu_attention.attend(query, key, value, attention_mask, scale, packed_rows), None
    return grouped_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, packed_rows, **kwargs)


def fold_mask(mask: Tensor, kv_heads: int, group: int) -> Tensor:
    """A mask [b, 1 or H, N, S] for the folded query [B, KVH, group * N, D]: row g * N + n of head
    k is query head k * group + g at position n."""
    b, mask_heads, length, keys = mask.shape
    if mask_heads == 1:
        return mask[:, :, None].expand(b, 1, group, length, keys).reshape(b, 1, group * length, keys)
    return mask.reshape(b, kv_heads, group * length, keys)


def register(kernel: bool = False) -> str:
    """Make `grouped_sdpa` (or, `kernel`, `grouped_kernel`) available to `model.set_attn_implementation`;
    returns its name. Masks are built as for `sdpa` (transformers leaves the mask out only where SDPA's
    own causal flag is exact: a prompt's first chunk, or one query token)."""
    name, function = (KERNEL_NAME, grouped_kernel) if kernel else (NAME, grouped_sdpa)
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name


def uses_grouped_query(config) -> bool:
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return bool(heads and kv_heads and heads > kv_heads)
