import pytest
import torch

from specserve.drafting.base import DraftContext
from specserve.drafting.budget import TreeBudget, TreeMode
from specserve.drafting.ngram import NgramConfig, NgramProposer, merge_into_trie
from specserve.kernels.sampling import LogitsParams

A, B, C, D = 10, 11, 12, 13


def open_session(tokens, depth=3, branching=2, nodes=16, max_n=2):
    proposer = NgramProposer(TreeBudget(depth=depth, branching=branching, draft_nodes=nodes), torch.device("cpu"),
                             NgramConfig(max_n=max_n))
    return proposer.open(DraftContext(tokens, LogitsParams(), None))


def tree_lists(proposal):
    return proposal.tree.tokens[0].tolist(), proposal.tree.parents[0].tolist()


def test_docstring_example_two_branches():
    session = open_session([A, B, C, A, B, D, A])
    tokens, parents = tree_lists(session.propose(B))
    assert tokens == [B, D, A, B, C, A, B]
    assert parents == [-1, 0, 1, 2, 0, 4, 5]


def test_chain_mode_keeps_the_best_continuation_only():
    proposer = NgramProposer(TreeBudget(depth=3, branching=2, mode=TreeMode.CHAIN), torch.device("cpu"),
                             NgramConfig(max_n=2))
    session = proposer.open(DraftContext([A, B, C, A, B, D, A], LogitsParams(), None))
    tokens, parents = tree_lists(session.propose(B))
    assert tokens == [B, D, A, B]  # the latest occurrence of "A B" only
    assert parents == [-1, 0, 1, 2]


def test_static_mode_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="n-gram drafting cannot fill a static tree"):
        NgramProposer(TreeBudget(mode=TreeMode.STATIC), torch.device("cpu"))


def test_shared_prefixes_share_nodes():
    # "A B" followed by "C D" twice and "C A" once: the C node is shared
    session = open_session([A, B, C, A, A, B, C, D, A], depth=2, branching=3)
    tokens, parents = tree_lists(session.propose(B))
    assert tokens == [B, C, D, A]
    assert parents == [-1, 0, 1, 1]


def test_no_match_gives_root_only():
    session = open_session([A, B, C])
    tokens, parents = tree_lists(session.propose(D))
    assert tokens == [D] and parents == [-1]


def test_commit_extends_the_index():
    session = open_session([A, B])
    assert tree_lists(session.propose(C))[0] == [C]
    session.commit([C, D], None)  # root C and accepted D entered the cache
    tokens, _ = tree_lists(session.propose(C))  # "... C D" + root C: C was followed by D
    assert tokens[:2] == [C, D]


def test_budget_keeps_best_continuation_whole():
    tokens, parents = merge_into_trie(A, [[B, C, D], [C, D]], budget=4)
    assert tokens == [A, B, C, D, C] and parents == [-1, 0, 1, 2, 0]
    tokens, _ = merge_into_trie(A, [[B, C, D], [C, D]], budget=2)
    assert tokens == [A, B, C]
