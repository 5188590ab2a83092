"""Drafter names shared by the CLI and the server: `none`, `ngram`, or a draft model."""

from __future__ import annotations

from typing import Callable

import torch

from ..server.config import EngineConfig
from .base import Proposer
from .draft_model import DraftModelProposer
from .ngram import NgramProposer
from .none import NoDraftProposer

# A model-path drafter needs the loader (store resolution, dtype, device), which lives in the server;
# the engine passes it in so this package does not depend on the model store.
LoadModel = Callable[[str], torch.nn.Module]


def make_proposer(config: EngineConfig, device: torch.device, load_model: LoadModel) -> Proposer:
    """Build the proposer that `config.draft` names."""
    if config.draft == "none":
        return NoDraftProposer(device)
    if config.draft == "ngram":
        return NgramProposer(config.tree, device)
    return DraftModelProposer(load_model(config.draft), config.tree)
