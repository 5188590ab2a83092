import torch

from specserve.drafting.base import DraftContext
from specserve.drafting.ngram import NgramConfig, NgramProposer, merge_into_trie
from specserve.server.config import SamplingParams, TreeConfig

A, B, C, D = 10, 11, 12, 13


def open_session(tokens, depth=3, top_k=2, nodes=16, max_n=2):
    proposer = NgramProposer(TreeConfig(depth=depth, top_k=top_k, nodes=nodes), torch.device("cpu"),
                             NgramConfig(max_n=max_n))
    return proposer.open(DraftContext(tokens, SamplingParams(), None))


def tree_lists(proposal):
    return proposal.tree.tokens[0].tolist(), proposal.tree.parents[0].tolist()


def test_docstring_example_two_branches():
    session = open_session([A, B, C, A, B, D, A])
    tokens, parents = tree_lists(session.propose(B))
    assert tokens == [B, D, A, B, C, A, B]
    assert parents == [-1, 0, 1, 2, 0, 4, 5]


def test_shared_prefixes_share_nodes():
    # "A B" followed by "C D" twice and "C A" once: the C node is shared
    session = open_session([A, B, C, A, A, B, C, D, A], depth=2, top_k=3)
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
