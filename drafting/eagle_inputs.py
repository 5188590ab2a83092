"""What an EAGLE/MSD head consumes for a prompt, per image mode; used by the session and by training.

EAGLE's alignment: the drafter entry for target position j >= 1 pairs the embedding of token x_j with
the target's feature h_{j-1} (fc of their concatenation); its output predicts the feature h_j, whose
LM-head logits predict token x_{j+1}. Position 0 has no feature before it, so a prompt of L tokens
gives L - 1 entries; the root token (known only after prefill) adds the L-th.

At image placeholder positions `ImageMode` decides the entry (v_j = the target's projected visual
embedding at j, e(<image>) = the placeholder token's embedding):

    text_only         fc(e(<image>), h_{j-1})
    fused             fc(v_j, h_{j-1})
    decoupled         v_j                    (MSD: no fc, the target's h at images is not used)
    decoupled_pooled  means of v_j over stride x stride patches (see `pool_image_runs`)

Worked example (decoupled_pooled, stride 2): tokens t0 t1 I2 I3 I4 I5 t6, a 2x2 patch grid at 2..5:
    decoupled entries  fc(e(t1),h0)  v2  v3  v4  v5  fc(e(t6),h5)      sources [1, 2, 3, 4, 5, 6]
    pooled entries     fc(e(t1),h0)  mean(v2..v5)    fc(e(t6),h5)      sources [1, -1, 6]
Drafter positions count the drafter's own entries (0, 1, 2 here), so after an image of m tokens the
text sits m - m / stride^2 positions earlier for the drafter than for the target; RoPE only sees
relative offsets, and training builds the same compacted sequence, so the head learns this layout.
For an M-RoPE target (Qwen2-VL) the head is a layer of the target's family whose rotary puts the
drafter position on all three rows, i.e. plain RoPE over the entries (as MSD's Qwen2-VL heads): the
target's (t, h, w) image positions never reach the head, in training or in drafting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .eagle_head import EagleHead, ImageMode


@dataclass(frozen=True)
class PromptEntries:
    inputs: torch.Tensor  # [n, H] drafter inputs
    sources: torch.Tensor  # [n] long: target position j of the token each entry consumes; -1 if pooled
    token_embeds: torch.Tensor  # [n, H] what fc fused with the feature (training re-fuses with its own)
    fused: torch.Tensor  # [n] bool: the entry went through fc (False for visual entries in decoupled modes)


def prompt_entries(
    head: EagleHead,
    embed_tokens: nn.Module,
    token_ids: torch.Tensor,  # [L] long
    hidden: torch.Tensor,  # [L, H] target final-norm hidden states
    inputs_embeds: torch.Tensor,  # [L, H] target input embeddings (visual ones at image slots)
    image_mask: torch.Tensor,  # [L] bool
) -> PromptEntries:
    """The drafter entries for target positions 1..L-1 of a prompt (see the module docstring)."""
    mode = head.settings.image_mode
    sources = torch.arange(1, len(token_ids), device=token_ids.device)
    image = image_mask[1:]
    # inputs_embeds equals the token embedding at text positions, so only text_only re-embeds
    tokens = embed_tokens(token_ids[1:]) if mode is ImageMode.TEXT_ONLY else inputs_embeds[1:]
    tokens = tokens.to(hidden.dtype)
    inputs = head.fuse(tokens, hidden[:-1])
    if mode in (ImageMode.TEXT_ONLY, ImageMode.FUSED):
        return PromptEntries(inputs, sources, tokens, torch.ones_like(image))
    inputs = torch.where(image[:, None], inputs_embeds[1:].to(inputs.dtype), inputs)
    entries = PromptEntries(inputs, sources, tokens, ~image)
    if mode is ImageMode.DECOUPLED:
        return entries
    return pool_image_runs(entries, image, head.settings.pool_stride)


def pool_image_runs(entries: PromptEntries, image: torch.Tensor, stride: int) -> PromptEntries:
    """Replace every run of consecutive image entries by its pooled entries (sources -1).

    A run of side^2 entries with side divisible by `stride` is a raster-order patch grid and is
    average-pooled over stride x stride squares; any other run is pooled over consecutive groups of
    stride^2 entries (the last group may be shorter)."""
    keep = {name: [] for name in ("inputs", "sources", "token_embeds", "fused")}
    start = 0
    for begin, end in image_runs(image) + [(len(image), len(image))]:
        for name in keep:
            keep[name].append(getattr(entries, name)[start:begin])
        if begin < end:
            pooled = pool_run(entries.inputs[begin:end], stride)
            keep["inputs"].append(pooled)
            keep["sources"].append(torch.full((len(pooled),), -1, device=pooled.device))
            keep["token_embeds"].append(torch.zeros_like(pooled))
            keep["fused"].append(torch.zeros(len(pooled), dtype=torch.bool, device=pooled.device))
        start = end
    return PromptEntries(**{name: torch.cat(parts) for name, parts in keep.items()})


def pool_run(run: torch.Tensor, stride: int) -> torch.Tensor:
    """[m, H] visual entries of one image -> [m', H] pooled entries (see `pool_image_runs`)."""
    m, hidden = run.shape
    side = math.isqrt(m)
    if side * side == m and side % stride == 0:
        cells = side // stride
        grid = run.reshape(cells, stride, cells, stride, hidden)  # rows, row-in-cell, cols, col-in-cell
        return grid.mean(dim=(1, 3)).reshape(cells * cells, hidden)
    return torch.stack([group.mean(0) for group in run.split(stride * stride)])


def image_runs(image: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of every run of True in a 1-D bool tensor (one host sync)."""
    runs, start = [], None
    for i, flag in enumerate(image.tolist() + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs
