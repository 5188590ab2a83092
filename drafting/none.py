"""No drafting: every step verifies the root alone, which is plain autoregressive decoding."""

from __future__ import annotations

import torch

from .base import DraftContext, DraftProposal, SequentialProposer, root_only


class NoDraftProposer(SequentialProposer):
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def open(self, context: DraftContext) -> NoDraftSession:
        return NoDraftSession(self.device)


class NoDraftSession:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def propose(self, root_token: int) -> DraftProposal:
        return root_only(root_token, self.device)

    def commit(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        pass

    def close(self) -> None:
        pass
