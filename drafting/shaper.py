"""One tree shaper for every drafter that scores tokens: budget + `expand` -> `DraftTree`.

A drafter supplies `expand(candidates, frontier, level)` (log-probs of the frontier nodes' children,
usually one forward per level, as a generator that yields the forward it needs: see `batched.py`);
the shaper decides which nodes to grow and keep, in the mode the `TreeBudget` names. `level_mask` is
the attention mask such a forward needs: each new node sees the committed text and the cache rows of
its own ancestors.

Worked example of `level_mask` (committed=3 cached rows, ancestors of nodes 4 and 5 cached at rows 3
and 4, cache_len=5): node 4's ancestor is node 1 (row 3), node 5's ancestors are nodes 2, 1 (rows 4, 3):
    row 0 (node 4): [1 1 1 | 1 0 | 1 0]
    row 1 (node 5): [1 1 1 | 1 1 | 0 1]
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

from ..kernels.tree import DraftTree
from .budget import TreeBudget, TreeMode
from .dynamic_tree import Candidates, ExpandFn, build_dynamic_tree
from .static_trees import PRESETS, build_static_tree


def shape_tree(
    root_token: int, expand: ExpandFn, budget: TreeBudget, device: torch.device
) -> Generator[Any, Any, DraftTree]:
    """The draft tree below `root_token` in `budget.mode` (a generator passing through what `expand`
    yields, returning the tree):
    - CHAIN: the single best path of `depth` tokens (one child per level);
    - DYNAMIC: EAGLE-2 growth by `branching`, keeping the `draft_nodes` best nodes;
    - STATIC: the preset's fixed shape filled with the ranked children."""
    if budget.mode is TreeMode.CHAIN:
        return (yield from build_dynamic_tree(root_token, expand, 1, budget.depth, budget.depth, device))
    if budget.mode is TreeMode.STATIC:
        return (yield from build_static_tree(root_token, expand, PRESETS[budget.preset], device))
    return (yield from build_dynamic_tree(root_token, expand, budget.branching, budget.depth, budget.draft_nodes,
                                          device))


def largest_tree(budget: TreeBudget) -> int:
    """Nodes (root included) of the largest tree a drafter may propose under `budget`."""
    if budget.mode is TreeMode.CHAIN:
        return budget.depth + 1
    if budget.mode is TreeMode.STATIC:
        return len(PRESETS[budget.preset]) + 1
    return budget.draft_nodes + 1


def draft_rows(budget: TreeBudget) -> int:
    """A bound on the rows one proposal appends to a model drafter's cache past the committed text:
    the catch-up (accepted drafts + root), every expanded level (each at most a whole tree), and the
    padding a batched forward adds to a row (at most its widest forward)."""
    widest = max(budget.depth + 1, largest_tree(budget))
    return budget.depth + 1 + budget.depth * widest + widest


def level_mask(
    cands: Candidates, nodes: list[int], slots: dict[int, int], committed: int, cache_len: int,
    device: torch.device,
) -> torch.Tensor:
    """[len(nodes), cache_len + len(nodes)] bool: which cache rows each node of a new level may see.

    `slots` maps every earlier tree node to its cache row; the first `committed` rows hold the
    committed text (and the root), the new nodes are appended after `cache_len` rows."""
    n = len(nodes)
    rows, cols = [], []
    for row, node in enumerate(nodes):
        for ancestor in cands.ancestors(node):
            rows.append(row)
            cols.append(slots[ancestor])
    allowed = torch.zeros(n, cache_len + n, dtype=torch.bool, device=device)
    allowed[:, :committed] = True
    allowed[rows, cols] = True
    allowed[torch.arange(n), cache_len + torch.arange(n)] = True  # each node sees itself
    return allowed
