"""The `--draft` names -> a proposer from `drafting/`: `none`, `ngram`, `suffix`, `self:N` / `self:auto`,
an EAGLE/MSD head or a draft model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ...drafting.base import Proposer
from ...drafting.draft_model import DraftModelProposer, check_draft_vocabulary
from ...drafting.eagle import EagleProposer
from ...drafting.eagle_head import is_eagle_folder, load_head
from ...drafting.ngram import NgramProposer
from ...drafting.none import NoDraftProposer
from ...drafting.self_draft import self_draft_proposer
from ...drafting.suffix import SuffixConfig, SuffixProposer, SuffixStats
from .calibration import calibrate_self_layers
from .config import EngineConfig

if TYPE_CHECKING:
    from .target import TargetModel

SELF_PREFIX = "self:"  # `self:N`: draft with the target's first N layers
SELF_AUTO = "auto"  # `self:auto`: N measured at load (`calibration.calibrate_self_layers`)

# A model-path drafter needs the loader (store resolution, dtype, device); the engine passes it in,
# so that a test or an embedder can hand in its own.
LoadModel = Callable[[str], torch.nn.Module]
# Store alias / folder / hub id -> a local folder (or the hub id itself).
Resolve = Callable[[str], str]


def make_proposer(config: EngineConfig, target: TargetModel, load_model: LoadModel, resolve: Resolve,
                  tokenizer_size: int) -> Proposer:
    """Build the proposer that `config.draft` names.

    A folder in the EAGLE-1/MSD head layout (recognised by its weight keys, not its name) becomes an
    EAGLE proposer sharing the target's embeddings and LM head; any other model is a draft LM, which
    must read every one of the target tokenizer's `tokenizer_size` tokens.
    `suffix` shares past outputs across requests (one store per proposer, i.e. per engine); `self:N`
    drafts with the target's own first N layers, `self:auto` with the N that decodes fastest here."""
    if config.draft_share_prompts and config.draft != "suffix":
        raise ValueError(f"draft_share_prompts applies to the suffix drafter, not to {config.draft!r}")
    if config.draft == "none":
        proposer = NoDraftProposer(target.device)
    elif config.draft == "ngram":
        proposer = NgramProposer(config.tree, target.device)
    elif config.draft == "suffix":
        suffix = SuffixConfig(share_prompts=config.draft_share_prompts)
        proposer = SuffixProposer(config.tree, target.device, suffix)
    elif config.draft.startswith(SELF_PREFIX):
        if target.is_multimodal:
            raise ValueError("self-drafting supports text-only models (a LLaVA target's decoder sits "
                             "behind its vision tower)")
        proposer = self_draft_proposer(target.model, _self_layers(config, target), config.tree)
    elif is_eagle_folder(path := str(resolve(config.draft))):
        head = load_head(path, target.config, target.dtype, target.device)
        proposer = EagleProposer(head, target.embed_tokens, target.lm_head, target.softcap, config.tree)
    else:
        model = load_model(path)
        check_draft_vocabulary(model, min(tokenizer_size, target.config.vocab_size))  # the ids the target reads
        return DraftModelProposer(model, config.tree, target.config.vocab_size)
    # `draft_quantization` shrinks a draft LM; asking for it with another drafter is a mistake
    if config.draft_quantization != "none":
        raise ValueError(f"draft_quantization={config.draft_quantization!r} applies to a draft LM, "
                         f"not to the drafter {config.draft!r}")
    return proposer


def _self_layers(config: EngineConfig, target: TargetModel) -> int:
    value = config.draft.removeprefix(SELF_PREFIX)
    if value == SELF_AUTO:
        return calibrate_self_layers(target, config.tree)
    if not value.isdigit():
        raise ValueError(f"--draft self:N takes a number of layers or 'auto', got {config.draft!r}")
    return int(value)


def suffix_stats(proposer: Proposer | None) -> SuffixStats | None:
    """The suffix drafter's counters (`/metrics`), or None for another drafter (or none yet loaded)."""
    return proposer.stats if isinstance(proposer, SuffixProposer) else None
