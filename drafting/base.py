"""The drafter interface: a `Proposer` opens one `DraftSession` per sequence.

A session proposes a token tree rooted at the sequence's last emitted token (the *root*, which the
target has not consumed yet) and is told, after verification, which tokens entered the target's KV
cache, with the target's last hidden states at them (EAGLE/MSD heads draft from those).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..kernels.sampling import LogitsParams
from ..kernels.tree import DraftTree


@dataclass(frozen=True)
class DraftContext:
    """What a session starts from: the prompt as the target saw it at prefill."""

    token_ids: list[int]  # prompt tokens (image placeholders included)
    params: LogitsParams  # the request's temperature / top-p / top-k (a chain drafter samples with them)
    generator: torch.Generator | None
    hidden: torch.Tensor | None = None  # [L, H] target last hidden states (only if the proposer asks)
    inputs_embeds: torch.Tensor | None = None  # [L, H] the target's input embeddings (visual at images)
    image_mask: torch.Tensor | None = None  # [L] bool, True at image placeholder positions


@dataclass(frozen=True)
class DraftProposal:
    """A tree to verify. `draft_probs` is set only by chain drafters that sampled their tokens from a
    distribution q (row i = q used for node i+1), which lossless chain acceptance needs."""

    tree: DraftTree
    draft_probs: torch.Tensor | None = None  # [B, N-1, V]

    def first(self, num_nodes: int) -> DraftProposal:
        """The tree cut to its first `num_nodes` nodes (root included). Parents precede children,
        so any prefix is a tree; drafters put their likeliest nodes first (the shallow levels of an
        EAGLE-2 tree, the head of a chain, the best continuation of a trie)."""
        if num_nodes >= self.tree.num_nodes:
            return self
        tree = DraftTree.from_parents(self.tree.tokens[:, :num_nodes], self.tree.parents[:, :num_nodes])
        probs = self.draft_probs[:, : num_nodes - 1] if self.draft_probs is not None else None
        return DraftProposal(tree, probs)


class DraftSession(Protocol):
    def propose(self, root_token: int) -> DraftProposal:
        """A tree whose node 0 is `root_token`; its other nodes are draft tokens."""
        ...

    def commit(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        """`tokens` (the root and the accepted draft tokens, in order) entered the target's cache;
        `hidden` [len(tokens), H] holds the target's last hidden states at them (if asked for)."""
        ...

    def close(self) -> None:
        """Free whatever the session holds (draft KV cache)."""
        ...


class Proposer(Protocol):
    needs_hidden_states: bool  # whether sessions need target hidden states (costs nothing extra here)

    def open(self, context: DraftContext) -> DraftSession:
        ...
