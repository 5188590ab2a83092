"""The drafter interface: a `Proposer` opens one `DraftSession` per sequence.

A session proposes a token tree rooted at the sequence's last emitted token (the *root*, which the
target has not consumed yet) and is told, after verification, which tokens entered the target's KV
cache, with the target's last hidden states at them (EAGLE/MSD heads draft from those).

The engine asks the proposer for a whole batch's proposals at once (`propose_batch`): model drafters
run every session's forward of a tree level as one forward (`batched.py`), over a KV cache with one
slot per sequence (the sequence's slot in the target's cache) that the engine sizes with `reserve`.
Drafters without a model (n-gram, suffix, none) propose session by session (`SequentialProposer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..kernels.sampling import LogitsParams
from ..kernels.tree import DraftTree, chain_tree


@dataclass(frozen=True)
class DraftContext:
    """What a session starts from: the prompt as the target saw it at prefill."""

    token_ids: list[int]  # prompt tokens (image placeholders included)
    params: LogitsParams  # the request's temperature / top-p / top-k (a chain drafter samples with them)
    generator: torch.Generator | None
    hidden: torch.Tensor | None = None  # [L, H] target last hidden states (only if the proposer asks)
    inputs_embeds: torch.Tensor | None = None  # [L, H] the target's input embeddings (visual at images)
    image_mask: torch.Tensor | None = None  # [L] bool, True at image placeholder positions
    slot: int = 0  # the sequence's slot in the target's KV cache; a model drafter uses the same in its own


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


def root_only(root_token: int, device: torch.device) -> DraftProposal:
    """The proposal of no draft: the root alone (verifying it is one plain decoding step)."""
    return DraftProposal(chain_tree(torch.tensor([[root_token]], device=device)))


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

    def propose_batch(
        self, sessions: list[DraftSession], roots: list[int], grow: list[bool] | None = None,
    ) -> list[DraftProposal | Exception]:
        """Every session's proposal below its root, or the exception its own drafting raised (that
        session fails, the others go on). Raises if what the sessions share (a batched forward) fails.
        A session with `grow` False proposes its root alone (the engine found that drafting cannot pay
        this turn; a model drafter then defers its catch-up to its next drafting turn); None = every
        session drafts."""
        ...

    def kv_bytes_per_token(self) -> int:
        """Bytes the drafter's own KV cache takes per cached token of one sequence (0: none)."""
        ...

    def reserve(self, num_slots: int, capacity: int) -> None:
        """Size the drafter's KV cache: `num_slots` sequences of up to `capacity` drafter rows each.
        The engine calls it once, before opening sessions."""
        ...


class SequentialProposer:
    """Base of the drafters without a model (n-gram, suffix, none): sessions propose one by one on
    the host, and there is no drafter KV cache to size."""

    needs_hidden_states = False

    device: torch.device

    def propose_batch(
        self, sessions: list[DraftSession], roots: list[int], grow: list[bool] | None = None,
    ) -> list[DraftProposal | Exception]:
        proposals: list[DraftProposal | Exception] = []
        for i, (session, root) in enumerate(zip(sessions, roots)):
            if grow is not None and not grow[i]:
                proposals.append(root_only(root, self.device))  # the session learns the text at commit
                continue
            try:
                proposals.append(session.propose(root))
            except Exception as exc:  # this session's fault only
                proposals.append(exc)
        return proposals

    def kv_bytes_per_token(self) -> int:
        return 0

    def reserve(self, num_slots: int, capacity: int) -> None:
        pass
