"""Static draft trees: a fixed shape, given as data, filled with the drafter's ranked guesses.

A preset is a list of paths; each path lists, level by level, which ranked child to take (0 = the
drafter's best guess). `(0, 1)` is "the second-best child of the best first token". Every prefix of a
path must be in the preset too, so the shape is a tree. Static trees suit hardware where a fixed
shape can be compiled once; dynamic trees (`dynamic_tree.py`) adapt the shape to the draft's
confidence instead.

Worked example, preset [(0,), (1,), (0, 0)] over root r, drafter ranking r -> [a, b], a -> [c]:
    tokens [r, a, b, c], parents [-1, 0, 0, 1]
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

from ..kernels.tree import DraftTree
from .dynamic_tree import Candidates, ExpandFn

PRESETS: dict[str, tuple[tuple[int, ...], ...]] = {
    # 4 levels, 3 guesses for the first token: 8 draft nodes
    "small-8": ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0)),
    # 5 levels, 4 guesses for the first token: 16 draft nodes
    "medium-16": (
        (0,), (1,), (2,), (3,),
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0),
        (0, 0, 0, 0), (0, 0, 0, 0, 0),
    ),
}


def validate_preset(paths: tuple[tuple[int, ...], ...]) -> None:
    shape = set(paths)
    for path in paths:
        if not path or min(path) < 0:
            raise ValueError(f"preset paths are non-empty tuples of ranks >= 0, got {path}")
        if len(path) > 1 and path[:-1] not in shape:
            raise ValueError(f"preset path {path} has no parent {path[:-1]}")


def build_static_tree(
    root_token: int, expand: ExpandFn, paths: tuple[tuple[int, ...], ...], device: torch.device
) -> Generator[Any, Any, DraftTree]:
    """Fill the preset's shape level by level; one `expand` call per level."""
    validate_preset(paths)
    cands = Candidates([root_token], [-1], [0.0], [0])
    node_of: dict[tuple[int, ...], int] = {(): 0}
    depth = max(len(p) for p in paths)
    for level in range(depth):
        parents = sorted({p[:-1] for p in paths if len(p) == level + 1}, key=lambda p: node_of[p])
        frontier = [node_of[p] for p in parents]
        width = 1 + max(p[-1] for p in paths if len(p) == level + 1)
        logps = yield from expand(cands, frontier, level)
        top_logp, top_tok = logps.float().topk(width, dim=-1)
        top_logp, top_tok = top_logp.tolist(), top_tok.tolist()  # one host sync per level
        for row, parent_path in enumerate(parents):
            ranks = sorted(p[-1] for p in paths if p[:-1] == parent_path and len(p) == level + 1)
            new = cands.add_children(
                node_of[parent_path], [top_tok[row][r] for r in ranks], [top_logp[row][r] for r in ranks]
            )
            node_of.update({parent_path + (r,): n for r, n in zip(ranks, new)})
    return DraftTree.from_parents(
        torch.tensor([cands.tokens], device=device), torch.tensor([cands.parents], device=device)
    )
