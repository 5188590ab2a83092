"""Training-free drafting from the request's own text AND the outputs of earlier requests
(SuffixDecoding, arXiv 2411.04975; ADED's adaptive counts, arXiv 2407.12021).

The proposer keeps one shared `TokenIndex` of past outputs for the whole engine; each session keeps
its own index of its prompt and output (today's prompt lookup). To propose, the session looks up its
context (text + root) in both (the longest suffix n-gram, n <= max_n, that occurs), weighs every
occurrence by how far it agrees with the context (2 ** (length - best length), lengths counted past
max_n: a longer match is a more specific context, as a deeper suffix-tree node), merges the
continuations into a trie whose node weight is the summed weight of the occurrences through it, and
keeps the heaviest nodes: probability weight / total >= `min_prob`, at most `spec_factor * best
length` of them (short matches are weak evidence: small trees; long matches fill the budget), within
the `TreeBudget` (depth; `draft_nodes` in dynamic mode, one heaviest path in chain mode).

Privacy: a finished session adds only the tokens the model generated to the shared store; the prompt
is added too only with `share_prompts`, since other users' drafts would then be built from it (a draft
is never shown to a user, but its acceptance changes timing). Generated text may still quote its
prompt. Written here: the reference implementation (Arctic Inference's C++ suffix tree, behind vLLM's
`method="suffix"`) is a vLLM plugin, not a standalone maintained library that fits the `Proposer`
protocol, and is not on this project's package index; this pure-Python store is small and bounded.

Worked example (max_n=2, depth=3, draft_nodes=4, min_prob=0.1, spec_factor=1): own text "x b",
root "c", shared outputs 0 = "b c d e f" and 1 = "y b c d g":
    context "x b c": the own text has "b c" only at its end (nothing follows: skipped)
    shared: "b c" in doc 1 (before it "y" != "x": length 2) and doc 0 (at its start: length 2)
    weights 1 and 1; continuations (newest first) "d g", "d e f"
    trie: c -> d (2) -> g (1) ; d -> e (1) -> f (1)        best length 2 -> at most 2 nodes
    heaviest 2 (ties: shallower, then earlier): d, g  ->  tokens [c, d, g], parents [-1, 0, 1]
Own-text continuations are merged first, so they win ties against past outputs.

Only greedy requests draft from the shared store (every request adds its output to it): sampled
acceptance draws a different number of random values for a different tree, so a seeded request
would otherwise depend on what other requests left in the store and lose its reproducibility.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.tree import DraftTree
from .base import DraftContext, DraftProposal, SequentialProposer
from .budget import TreeBudget, TreeMode
from .dynamic_tree import keep_nodes
from .token_index import Match, TokenIndex


@dataclass(frozen=True)
class SuffixConfig:
    max_n: int = 4  # longest n-gram indexed; matches are then extended up to `max_match` tokens
    max_match: int = 32
    max_occurrences: int = 64  # occurrences weighed per proposal, from each index
    max_shared_tokens: int = 100_000  # bound of the shared store (least recently used outputs go first)
    share_prompts: bool = False  # also share prompt tokens with other requests' drafts
    min_prob: float = 0.1  # a node's weight / the root's, below which it is not proposed
    spec_factor: float = 1.0  # at most spec_factor * match length draft nodes (SuffixDecoding's alpha)


@dataclass
class SuffixStats:
    """Counters for `/metrics`: how much the shared store helps."""

    proposals: int = 0
    shared_proposals: int = 0  # proposals with at least one draft node taken from past outputs
    draft_nodes: int = 0
    shared_nodes: int = 0  # draft nodes that past outputs support (the own text may support them too)


class SuffixProposer(SequentialProposer):
    def __init__(self, tree: TreeBudget, device: torch.device, config: SuffixConfig = SuffixConfig()) -> None:
        if tree.mode is TreeMode.STATIC:
            raise ValueError("suffix drafting cannot fill a static tree shape (its trie follows what the "
                             "text repeats); use --tree-mode dynamic or chain")
        self.tree = tree
        self.device = device
        self.config = config
        self.shared = TokenIndex(config.max_n, config.max_shared_tokens, config.max_match)
        self.stats = SuffixStats()
        self._next_doc = 0

    def open(self, context: DraftContext) -> SuffixSession:
        return SuffixSession(self, context.token_ids, use_shared=context.params.greedy)

    def publish(self, tokens: list[int]) -> None:
        """Add a finished request's tokens to the shared store as one document."""
        if tokens:
            self.shared.extend(self._next_doc, tokens)
            self._next_doc += 1

    def reset(self) -> None:
        """Forget every past output (a cold store, e.g. between benchmark repeats)."""
        self.shared.clear()


class SuffixSession:
    def __init__(self, proposer: SuffixProposer, prompt: list[int], use_shared: bool) -> None:
        self.proposer = proposer
        self.use_shared = use_shared
        self.config = proposer.config
        self.prompt_len = len(prompt)
        self.own = TokenIndex(self.config.max_n, None, self.config.max_match)
        self.own.extend(0, prompt)

    @property
    def text(self) -> list[int]:
        return self.own.docs[0]

    def commit(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        # tokens[0] is the root, which `propose` already added
        self.own.extend(0, tokens[1:])

    def close(self) -> None:
        if self.own is None:
            return
        start = 0 if self.config.share_prompts else self.prompt_len
        self.proposer.publish(self.text[start:])
        self.own = None

    def propose(self, root_token: int) -> DraftProposal:
        self.own.extend(0, [root_token])
        tree = self.proposer.tree
        chain = tree.mode is TreeMode.CHAIN
        # where the context (text + root) occurred before: in this request, and in past outputs
        own = self.own.matches(self.text, self.config.max_occurrences)
        shared = self.proposer.shared.matches(self.text, self.config.max_occurrences) if self.use_shared else []
        # merge what followed each occurrence, weighted 2 ** (its match length - the best one)
        trie = WeightedTrie(root_token)
        best = max((m.length for m in own + shared), default=0)
        firsts = [trie.add(self.own.continuation(m, tree.depth), 2.0 ** (m.length - best), False) for m in own]
        firsts += [trie.add(self.proposer.shared.continuation(m, tree.depth), 2.0 ** (m.length - best), True)
                   for m in shared]
        # keep the heaviest nodes; a longer match earns a larger tree (adaptive speculation length)
        size = min(tree.depth if chain else tree.draft_nodes, math.ceil(self.config.spec_factor * best))
        select = trie.heaviest_path if chain else trie.heaviest
        kept = select(size, self.config.min_prob)
        self._observe(trie, kept, shared, firsts[len(own):])
        return DraftProposal(trie.to_tree(kept, self.proposer.device))

    def _observe(self, trie: WeightedTrie, kept: list[int], shared: list[Match], firsts: list[int]) -> None:
        stats = self.proposer.stats
        from_shared = sum(trie.shared[node] for node in kept)
        stats.proposals += 1
        stats.draft_nodes += len(kept)
        stats.shared_nodes += from_shared
        stats.shared_proposals += from_shared > 0
        for match, first in zip(shared, firsts):
            if first in kept:  # this past output helped: evict it last
                self.proposer.shared.touch(match.doc)


class WeightedTrie:
    """Continuations merged below a root; a node's weight is the sum of the weights of the
    continuations through it, so a child never outweighs its parent."""

    def __init__(self, root_token: int) -> None:
        self.tokens, self.parents, self.depths = [root_token], [-1], [0]
        self.weights, self.shared = [0.0], [False]
        self.children: dict[int, dict[int, int]] = {0: {}}  # node -> token -> child node

    def add(self, path: list[int], weight: float, shared: bool) -> int:
        """Merge `path` below the root; returns its first node (0 if the path is empty)."""
        node = 0
        self.weights[0] += weight
        for token in path:
            child = self.children[node].get(token)
            if child is None:
                child = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(self.depths[node] + 1)
                self.weights.append(0.0)
                self.shared.append(False)
                self.children[node][token] = child
                self.children[child] = {}
            self.weights[child] += weight
            self.shared[child] |= shared
            node = child
        return self.children[0].get(path[0], 0) if path else 0

    def heaviest(self, size: int, min_prob: float) -> list[int]:
        """The `size` heaviest nodes with probability >= min_prob, ties to the shallower then the
        earlier node; ancestor-closed, since a parent weighs at least as much as its child. Returned
        level by level, heaviest first (sampled acceptance tries siblings in this order)."""
        floor = min_prob * self.weights[0]
        order = sorted((i for i in range(1, len(self.tokens)) if self.weights[i] >= floor),
                       key=lambda i: (-self.weights[i], self.depths[i], i))
        return sorted(order[:size], key=lambda i: (self.depths[i], -self.weights[i], i))

    def heaviest_path(self, size: int, min_prob: float) -> list[int]:
        """One path of up to `size` nodes, following the heaviest child (the earliest on a tie)."""
        floor = min_prob * self.weights[0]
        path, node = [], 0
        while len(path) < size and self.children[node]:
            node = max(self.children[node].values(), key=lambda c: (self.weights[c], -c))
            if self.weights[node] < floor:
                break
            path.append(node)
        return path

    def to_tree(self, kept: list[int], device: torch.device) -> DraftTree:
        """The root and `kept` (parents before children), renumbered."""
        return keep_nodes(self.tokens, self.parents, kept, device)
