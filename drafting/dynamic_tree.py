"""EAGLE-2 dynamic draft trees, independent of any model.

The drafter scores children with a callback; this module decides which nodes to expand and which to
keep. A node's score is the product of draft probabilities along its path (a sum of log-probs here),
so a child never outscores its parent and the best `budget` nodes always form a connected tree.

Worked example (branching=2, depth=2, budget=3), root r:
    expand(r)       -> children a (logp -0.1), b (-1.0)            frontier [a, b]
    expand([a, b])  -> a: c (-0.2), d (-2.0); b: e (-0.3), f (-3.0)
    scores: a -0.1, c -0.3, b -1.0, e -1.3, d -2.1, f -4.0         (depth reached: stop expanding)
    keep best 3: a, c, b  ->  tokens [r, a, b, c], parents [-1, 0, 0, 1]
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels.tree import DraftTree

# expand(candidates, frontier node ids, level) -> log-probs [len(frontier), V] of each frontier node's
# children. Node ids index the candidates (0 = root); the drafter reads tokens and ancestors from them.
# It is a generator function: a model drafter yields the forward it needs (`batched.DraftForward`) and
# returns the log-probs, so the trees of a whole batch grow together (see `batched.drive`); the tree
# builders below pass whatever it yields through (`yield from`).
ExpandFn = Callable[["Candidates", list[int], int], Generator[Any, Any, torch.Tensor]]


@dataclass
class Candidates:
    """All nodes generated so far; index 0 is the root."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]
    depths: list[int]

    def ancestors(self, node: int) -> list[int]:
        """Proper ancestors of `node`, root excluded, nearest first."""
        found = []
        node = self.parents[node]
        while node > 0:
            found.append(node)
            node = self.parents[node]
        return found

    def add_children(self, parent: int, tokens: list[int], logps: list[float]) -> list[int]:
        first = len(self.tokens)
        for token, logp in zip(tokens, logps):
            self.tokens.append(token)
            self.parents.append(parent)
            self.scores.append(self.scores[parent] + logp)
            self.depths.append(self.depths[parent] + 1)
        return list(range(first, len(self.tokens)))


def build_dynamic_tree(
    root_token: int, expand: ExpandFn, branching: int, depth: int, budget: int, device: torch.device
) -> Generator[Any, Any, DraftTree]:
    """Grow candidates for `depth` levels (expanding the `branching` best nodes of each new level by
    their `branching` best children), then keep the `budget` best draft nodes by path score. Growth
    stops early once deeper nodes could no longer be kept (same tree, fewer `expand` calls)."""
    cands = Candidates([root_token], [-1], [0.0], [0])
    frontier = [0]
    for level in range(depth):
        logps = yield from expand(cands, frontier, level)  # [len(frontier), V]
        # clamp: log-softmax rounding can give +1e-7, and a child must never outscore its parent
        top_logp, top_tok = logps.float().clamp(max=0.0).topk(branching, dim=-1)
        top_logp, top_tok = top_logp.tolist(), top_tok.tolist()  # one host sync per level
        new_nodes: list[int] = []
        for row, parent in enumerate(frontier):
            new_nodes += cands.add_children(parent, top_tok[row], top_logp[row])
        if level + 1 == depth:
            break
        new_nodes.sort(key=lambda i: -cands.scores[i])
        frontier = new_nodes[:branching]
        if _cannot_place(cands, frontier, budget):
            break  # the deeper levels could not change the kept tree: skip their draft forwards
    return select_best(cands, budget, device)


def _cannot_place(cands: Candidates, frontier: list[int], budget: int) -> bool:
    """True if no descendant of `frontier` could be among the `budget` best nodes.

    A descendant scores at most its frontier ancestor, and loses ties to every existing node (it is
    deeper), so it is out if the best frontier score does not beat the budget-th best score so far."""
    if len(cands.scores) - 1 < budget:
        return False
    kth_best = sorted(cands.scores[1:], reverse=True)[budget - 1]
    return cands.scores[frontier[0]] <= kth_best


def select_best(cands: Candidates, budget: int, device: torch.device) -> DraftTree:
    """Keep the root and the `budget` best nodes, renumbered so that parents precede children.

    Ties are broken by depth then creation order, which keeps the kept set ancestor-closed: a child's
    score is at most its parent's, and on equality the shallower parent ranks first."""
    order = sorted(range(1, len(cands.tokens)), key=lambda i: (-cands.scores[i], cands.depths[i], i))
    kept = sorted(order[:budget], key=lambda i: (cands.depths[i], i))
    return keep_nodes(cands.tokens, cands.parents, kept, device)


def keep_nodes(tokens: list[int], parents: list[int], kept: list[int], device: torch.device) -> DraftTree:
    """The tree of the root (node 0) and the `kept` nodes of a larger candidate tree, renumbered in
    the order given (which must list parents before children)."""
    new_index = {0: 0}
    out_tokens, out_parents = [tokens[0]], [-1]
    for old in kept:
        new_index[old] = len(out_tokens)
        out_tokens.append(tokens[old])
        out_parents.append(new_index[parents[old]])
    return DraftTree.from_parents(
        torch.tensor([out_tokens], device=device), torch.tensor([out_parents], device=device)
    )
