"""A drafter told how many nodes the engine will verify (`propose(root, max_nodes)`) grows no more,
and its session's state does not depend on the limit: what it proposes next is the same."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.drafting.base import DraftContext
from specserve.drafting.budget import TreeBudget, TreeMode
from specserve.drafting.draft_model import DraftModelProposer
from specserve.drafting.ngram import NgramProposer
from specserve.kernels.sampling import LogitsParams

TREE = TreeBudget(depth=3, branching=2, draft_nodes=6)


def test_a_budget_within_a_limit():
    assert TREE.within(None) is TREE
    assert TREE.within(4) == TreeBudget(depth=3, branching=2, draft_nodes=3)
    assert TREE.within(3) == TreeBudget(depth=2, branching=2, draft_nodes=2)
    assert TREE.within(1) is None  # no draft node left
    static = TreeBudget(mode=TreeMode.STATIC, preset="small-8")
    assert static.within(3) is static  # a fixed shape: the engine cuts it


def tree_lists(proposal) -> tuple[list[int], list[int]]:
    return proposal.tree.tokens[0].tolist(), proposal.tree.parents[0].tolist()


@pytest.mark.parametrize("mode", [TreeMode.DYNAMIC, TreeMode.CHAIN])
def test_a_limited_draft_model_session_stays_in_step(tiny_model_dirs, mode):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float64).eval()
    proposer = DraftModelProposer(model, TreeBudget(depth=3, branching=2, draft_nodes=6, mode=mode))
    context = DraftContext([5, 9, 23, 7, 41], LogitsParams(), None)
    limited, free = proposer.open(context), proposer.open(context)
    # step 1: nothing will be verified, so nothing is drafted (the root still enters the draft cache)
    assert tree_lists(limited.propose(11, max_nodes=1)) == ([11], [-1])
    assert free.propose(11).tree.num_nodes > 1
    for session in (limited, free):
        session.commit([11], None)  # no draft accepted, the bonus token is 17
    # step 2: at most 3 nodes
    capped = limited.propose(17, max_nodes=3)
    assert 1 < capped.tree.num_nodes <= 3
    free.propose(17)
    for session in (limited, free):
        session.commit([17], None)
    # step 3: unlimited, the limited session proposes exactly what the other one does
    assert tree_lists(limited.propose(3)) == tree_lists(free.propose(3))


def test_ngram_grows_no_more_than_the_limit():
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    session = NgramProposer(TREE, torch.device("cpu")).open(DraftContext(tokens, LogitsParams(), None))
    assert session.propose(3, max_nodes=3).tree.num_nodes == 3
    assert session.propose(3, max_nodes=1).tree.num_nodes == 1
