"""Drafter names shared by the CLI and the server: `none`, `ngram`, an EAGLE/MSD head or a draft model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ..server.config import EngineConfig
from .base import Proposer
from .draft_model import DraftModelProposer
from .eagle import EagleProposer
from .eagle_head import is_eagle_folder, load_head
from .ngram import NgramProposer
from .none import NoDraftProposer

if TYPE_CHECKING:
    from ..server.target import TargetModel

# A model-path drafter needs the loader (store resolution, dtype, device), which lives in the server;
# the engine passes it in so this package does not depend on the model store.
LoadModel = Callable[[str], torch.nn.Module]
# Store alias / folder / hub id -> a local folder (or the hub id itself).
Resolve = Callable[[str], str]


def make_proposer(config: EngineConfig, target: TargetModel, load_model: LoadModel, resolve: Resolve) -> Proposer:
    """Build the proposer that `config.draft` names.

    A folder in the EAGLE-1/MSD head layout (recognised by its weight keys, not its name) becomes an
    EAGLE proposer sharing the target's embeddings and LM head; any other model is a draft LM."""
    if config.draft == "none":
        proposer = NoDraftProposer(target.device)
    elif config.draft == "ngram":
        proposer = NgramProposer(config.tree, target.device)
    elif is_eagle_folder(path := str(resolve(config.draft))):
        head = load_head(path, target.config, target.dtype, target.device)
        proposer = EagleProposer(head, target.embed_tokens, target.lm_head, target.softcap, config.tree)
    else:
        return DraftModelProposer(load_model(path), config.tree)
    # `draft_quantization` shrinks a draft LM; asking for it with another drafter is a mistake
    if config.draft_quantization != "none":
        raise ValueError(f"draft_quantization={config.draft_quantization!r} applies to a draft LM, "
                         f"not to the drafter {config.draft!r}")
    return proposer
