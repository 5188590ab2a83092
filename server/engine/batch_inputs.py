"""The decoder's inputs for a batch of whole sequences in one forward, each token as the engine serves it.

A row is a prompt (`TargetModel.embed`) followed by tokens decoded after it; rows are right-padded to
one width T. The engine prefills a prompt chunk by chunk (`PromptEmbeds.chunk_inputs`) and then decodes
causally at position = cache index + the prompt's rope delta; `batch_inputs` gives one forward over
such rows the same view, so its hidden states equal the engine's (training's teacher pass needs this).

Example (Gemma 3, T = 6): row 0 = a 4-token prompt whose tokens 1..2 are one image, + 1 answer token;
row 1 = a 2-token text prompt + 2 answer tokens, then two pads:
    row 0 blocks   -1 0 0 -1 | -1 | (pad)    query 1 sees 0..2 (its image both ways), query 4 sees 0..4
    row 1 blocks   -1 -1 | -1 -1 | (pads)    causal
Pads come after every real token of their row, so causal attention already hides them.
"""

from __future__ import annotations

import torch

from ...kernels.blocks import prefill_mask
from .target import PromptEmbeds


def batch_inputs(prompts: list[PromptEmbeds], lengths: list[int]) -> dict:
    """The decoder's inputs beyond `inputs_embeds` [B, T] (T = max(lengths)) for rows b = the prompt
    `prompts[b]` followed by `lengths[b] - its length` decoded tokens, by family (as `chunk_inputs`):
    - `position_ids` [3, B, T] where a prompt has M-RoPE positions: the prompt's own, then index + its
      rope delta on all three rows (rows without images: index);
    - `attention_mask` [B, 1, T, T] (or one per layer type, `LayerMasks`) where a prompt has
      bidirectional blocks: causal plus each row's prompt blocks, limited to the window on sliding layers;
    - `visual_pos_masks` [B, T] (the prompts' image tokens) and `deepstack_visual_embeds` (every row's
      image rows, in row order) where a prompt has deepstack features.
    {}: every row causal at positions = indices, the decoder's own defaults."""
    width = max(lengths)
    device = prompts[0].embeds.device
    inputs = {}
    if any(p.rope is not None for p in prompts):
        positions = torch.arange(width, device=device).expand(3, len(prompts), width).clone()
        for row, prompt in enumerate(prompts):
            if prompt.rope is not None:
                size = prompt.embeds.shape[1]
                positions[:, row, :size] = prompt.rope.position_ids[:, 0]
                positions[:, row, size:] += prompt.rope_delta
        inputs["position_ids"] = positions
    if any(p.blocks is not None for p in prompts):
        blocks = torch.full((len(prompts), width), -1, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            if prompt.blocks is not None:
                blocks[row, : prompt.blocks.shape[0]] = prompt.blocks
        dtype = prompts[0].embeds.dtype
        inputs["attention_mask"] = prompts[0].masks(
            lambda window: torch.cat([prefill_mask(row, 0, dtype, window) for row in blocks]))
    with_deepstack = [p for p in prompts if p.deepstack is not None]
    if with_deepstack:
        image_mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            image_mask[row, : prompt.image_mask.shape[1]] = prompt.image_mask[0]
        inputs["visual_pos_masks"] = image_mask
        inputs["deepstack_visual_embeds"] = [torch.cat(layer) for layer in zip(*(p.deepstack for p in with_deepstack))]
    return inputs
