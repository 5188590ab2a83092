"""The drafting vocabulary the engine configures: how large a draft tree may grow and how it is shaped."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TreeMode(enum.Enum):
    """How a drafter shapes its proposal (`shaper.shape_tree`)."""

    DYNAMIC = "dynamic"  # EAGLE-2: expand the best frontier nodes by their best children, keep the best
    CHAIN = "chain"  # one path of `depth` tokens (lossless sampling with a draft distribution needs it)
    STATIC = "static"  # a fixed shape from `static_trees.PRESETS`, filled with the drafter's ranked guesses


@dataclass(frozen=True)
class TreeBudget:
    """How large one draft tree may grow. On a CPU verify cost grows with `draft_nodes`: keep it small.

    The root (the last emitted token, which the target consumes in the same forward) is never counted:
    a tree holds at most `draft_nodes` draft tokens, i.e. `DraftTree.num_nodes` <= draft_nodes + 1.
    `branching` is how many children a node is expanded into (EAGLE-2's "top-k"); it has nothing to
    do with top-k filtering of a sampling distribution (`SamplingParams.top_k`).
    """

    depth: int = 5
    branching: int = 4
    draft_nodes: int = 16
    mode: TreeMode = TreeMode.DYNAMIC
    preset: str = "medium-16"  # the shape used in STATIC mode

    def __post_init__(self) -> None:
        if self.depth < 1 or self.branching < 1 or self.draft_nodes < 1:
            raise ValueError(f"tree depth, branching and draft_nodes must be >= 1, got {self}")
