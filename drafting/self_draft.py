"""Self-drafting (LayerSkip / Draft&Verify style early exit): the target's first N decoder layers,
then its own final norm and LM head, draft for the whole target. No second model, no second weights.

`early_exit_view(model, n)` returns a model object that shares every parameter with `model` and
differs only in its decoder's layer list and a config copy with `num_hidden_layers = n`, so HF's own
forward runs (no forked modeling code) and the result drafts through `DraftModelProposer` with its
own small DynamicCache of n layers (the target's KV rows for those layers are not reused: the
target's cache also holds the rows of the tree it just verified, and keeping two caches in step is
simpler than sharing one).

Worked example: a 2-layer Llama, n=1 -> view.model.layers = [layer 0], view.model.norm and
view.lm_head are the target's own modules; view(input_ids).logits has the target's vocabulary.
"""

from __future__ import annotations

import copy

import torch

from .budget import TreeBudget
from .draft_model import DraftModelProposer


def early_exit_view(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """`model` (an HF causal LM) cut after its first `layers` decoder layers, sharing its weights."""
    decoder = model.get_decoder()
    total = len(decoder.layers)
    if not 1 <= layers <= total:
        raise ValueError(f"self-drafting needs 1..{total} layers of this model, got {layers}")
    config = copy.copy(model.config)
    config.num_hidden_layers = layers  # HF decoders run `layers[: config.num_hidden_layers]`
    view_decoder = _shallow_copy(decoder, config, layers=torch.nn.ModuleList(decoder.layers[:layers]))
    name = next(name for name, child in model.named_children() if child is decoder)
    return _shallow_copy(model, config, **{name: view_decoder})


def _shallow_copy(module: torch.nn.Module, config, **children: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with its own child table and config; parameters and buffers stay shared."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone.config = config
    for name, child in children.items():
        setattr(clone, name, child)
    return clone


def self_draft_proposer(model: torch.nn.Module, layers: int, tree: TreeBudget) -> DraftModelProposer:
    """A draft-LM proposer over the first `layers` layers of the target `model`."""
    return DraftModelProposer(early_exit_view(model, layers), tree)
