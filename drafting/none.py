"""No drafting: every step verifies the root alone, which is plain autoregressive decoding."""

from __future__ import annotations

import torch

from ..kernels.tree import DraftTree
from .base import DraftContext, DraftProposal, SequentialProposer


class NoDraftProposer(SequentialProposer):

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def open(self, context: DraftContext) -> NoDraftSession:
        return NoDraftSession(self.device)


class NoDraftSession:
    def __init__(self, device: torch.device) -> None:
        self.parents = torch.tensor([[-1]], device=device)
        self.device = device

    def propose(self, root_token: int) -> DraftProposal:
        tokens = torch.tensor([[root_token]], device=self.device)
        return DraftProposal(DraftTree.from_parents(tokens, self.parents))

    def commit(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        pass

    def close(self) -> None:
        pass
