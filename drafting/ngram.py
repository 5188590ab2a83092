"""Training-free drafting by prompt lookup, proposing a tree of several continuations.

The session indexes every n-gram (n = 1..max_n) of the sequence by where it ends. To propose, it takes
the longest suffix n-gram of the sequence that occurred before, collects the continuations that
followed its most recent occurrences (falling back to shorter n-grams for more branches), and merges
them into a trie: shared prefixes share nodes, so several guesses cost one verify forward.

Worked example (max_n=2, depth=3, branches=2): sequence "a b c a b d a" + root "b":
    suffix "a b" occurred ending at positions 4 and 1 -> continuations [d, a, b] and [c, a, b]
    trie: r=b -> d -> a -> b ; r -> c -> a -> b   ->  tokens [b, d, a, b, c, a, b],
    parents [-1, 0, 1, 2, 0, 4, 5]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.tree import DraftTree
from .base import DraftContext, DraftProposal, SequentialProposer
from .budget import TreeBudget, TreeMode


@dataclass(frozen=True)
class NgramConfig:
    max_n: int = 4
    min_n: int = 1


class NgramProposer(SequentialProposer):
    def __init__(self, tree: TreeBudget, device: torch.device, config: NgramConfig = NgramConfig()):
        # The trie's shape comes from what the text repeats, not from ranked guesses, so a fixed shape
        # has nothing to fill it with; chain mode keeps the single best continuation.
        if tree.mode is TreeMode.STATIC:
            raise ValueError("n-gram drafting cannot fill a static tree shape (it has no ranked guesses "
                             "per node); use --tree-mode dynamic or chain")
        self.tree = tree
        self.device = device
        self.config = config

    def open(self, context: DraftContext) -> NgramSession:
        session = NgramSession(self.tree, self.config, self.device)
        session.extend(context.token_ids)
        return session


class NgramSession:
    def __init__(self, tree: TreeBudget, config: NgramConfig, device: torch.device) -> None:
        self.tree = tree
        self.config = config
        self.device = device
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions where it ends

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1
            for n in range(1, min(self.config.max_n, end + 1) + 1):
                self.ends.setdefault(tuple(self.tokens[end - n + 1 : end + 1]), []).append(end)

    def commit(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        self.extend(tokens)

    def close(self) -> None:
        self.ends.clear()

    def propose(self, root_token: int) -> DraftProposal:
        sequence = self.tokens + [root_token]
        continuations = self._continuations(sequence)
        budget = self.tree.depth if self.tree.mode is TreeMode.CHAIN else self.tree.draft_nodes
        tokens, parents = merge_into_trie(root_token, continuations, budget)
        tree = DraftTree.from_parents(
            torch.tensor([tokens], device=self.device), torch.tensor([parents], device=self.device)
        )
        return DraftProposal(tree)

    def _continuations(self, sequence: list[int]) -> list[list[int]]:
        """Up to `branching` distinct continuations (one in chain mode), longest matching n-gram and
        latest occurrence first."""
        found: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        depth = self.tree.depth
        branches = 1 if self.tree.mode is TreeMode.CHAIN else self.tree.branching
        for n in range(min(self.config.max_n, len(sequence) - 1), self.config.min_n - 1, -1):
            for end in reversed(self.ends.get(tuple(sequence[-n:]), [])):
                continuation = sequence[end + 1 : end + 1 + depth]
                key = tuple(continuation)
                if continuation and key not in seen:
                    seen.add(key)
                    found.append(continuation)
                    if len(found) == branches:
                        return found
        return found


def merge_into_trie(root: int, continuations: list[list[int]], budget: int) -> tuple[list[int], list[int]]:
    """Merge token paths below `root` into a trie of at most `budget` draft nodes (root excluded).
    Paths are taken in order, so the best continuation is kept whole when the budget runs out."""
    tokens, parents = [root], [-1]
    child_of: dict[tuple[int, int], int] = {}
    for path in continuations:
        node = 0
        for token in path:
            key = (node, token)
            if key not in child_of:
                if len(tokens) - 1 == budget:
                    return tokens, parents
                child_of[key] = len(tokens)
                tokens.append(token)
                parents.append(node)
            node = child_of[key]
    return tokens, parents
