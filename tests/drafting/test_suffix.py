import pytest
import torch

from specserve.drafting.base import DraftContext
from specserve.drafting.budget import TreeBudget, TreeMode
from specserve.drafting.suffix import SuffixConfig, SuffixProposer, WeightedTrie
from specserve.kernels.sampling import LogitsParams

A, B, C, D, E, F, G, X, Y = 10, 11, 12, 13, 14, 15, 16, 20, 21
CPU = torch.device("cpu")


def make_proposer(depth=3, branching=2, nodes=4, mode=TreeMode.DYNAMIC, **config):
    config = {"max_n": 2, **config}
    return SuffixProposer(TreeBudget(depth, branching, nodes, mode), CPU, SuffixConfig(**config))


def open_session(proposer, prompt, params=LogitsParams()):
    return proposer.open(DraftContext(prompt, params, None))


def tree_lists(proposal):
    return proposal.tree.tokens[0].tolist(), proposal.tree.parents[0].tolist()


def test_docstring_example():
    proposer = make_proposer()
    proposer.publish([B, C, D, E, F])
    proposer.publish([Y, B, C, D, G])
    tokens, parents = tree_lists(open_session(proposer, [X, B]).propose(C))
    assert tokens == [C, D, G] and parents == [-1, 0, 1]
    assert proposer.stats.shared_nodes == 2 and proposer.stats.shared_proposals == 1


def test_frequency_decides_the_branches():
    # "C" was followed by D three times and by E once: with min_prob 0.3 only D survives
    proposer = make_proposer(depth=1, nodes=4, min_prob=0.3, spec_factor=4)
    for follower in [D, D, E, D]:
        proposer.publish([C, follower])
    tokens, _ = tree_lists(open_session(proposer, [X]).propose(C))
    assert tokens == [C, D]


def test_longer_matches_outweigh_frequent_short_ones():
    # max_n=1: every output with "C" is an occurrence; how far each agrees with the context weighs it
    proposer = make_proposer(depth=1, nodes=4, spec_factor=4, max_n=1)
    proposer.publish([A, B, C, D])  # agrees with "A B C" over 3 tokens: weight 1
    for _ in range(3):
        proposer.publish([Y, C, E])  # over 1 token: weight 2 ** (1 - 3) = 1/4 each
    assert tree_lists(open_session(proposer, [A, B]).propose(C))[0] == [C, D, E]  # D (1) before E (3/4)
    for _ in range(2):
        proposer.publish([Y, C, E])  # now E weighs 5/4: frequency wins
    assert tree_lists(open_session(proposer, [A, B]).propose(C))[0] == [C, E, D]


def test_only_the_longest_ngram_that_occurs_is_looked_up():
    proposer = make_proposer(depth=1, nodes=4, spec_factor=4, max_n=2)
    proposer.publish([B, C, D])
    for _ in range(5):
        proposer.publish([Y, C, E])  # "C" alone: never consulted while "B C" occurs
    assert tree_lists(open_session(proposer, [A, B]).propose(C))[0] == [C, D]


def test_tree_size_grows_with_the_match_length():
    proposer = make_proposer(depth=4, nodes=8, max_n=2)
    proposer.publish([A, B, C, D, E, F, G])
    short = tree_lists(open_session(proposer, [Y]).propose(C))[0]  # "C": match length 1
    long = tree_lists(open_session(proposer, [A, B]).propose(C))[0]  # "A B C": match length 3
    assert short == [C, D] and long == [C, D, E, F]


def test_chain_mode_follows_the_heaviest_child():
    proposer = make_proposer(depth=3, mode=TreeMode.CHAIN, spec_factor=4)
    for tail in [[D, E, F], [G, E], [D, E, G]]:
        proposer.publish([C, *tail])
    tokens, parents = tree_lists(open_session(proposer, [X]).propose(C))
    assert tokens == [C, D, E, G] and parents == [-1, 0, 1, 2]  # ties go to the newest output


def test_only_generated_tokens_are_shared_by_default():
    proposer = make_proposer(spec_factor=4)
    session = open_session(proposer, [A, B, C])  # the prompt: private
    session.propose(D)
    session.commit([D, E], None)  # generated: D, E (root of the next step: F)
    session.propose(F)
    session.close()
    assert list(proposer.shared.docs.values()) == [[D, E, F]]
    session.close()  # closing twice publishes nothing more
    other = open_session(proposer, [X])
    assert tree_lists(other.propose(A))[0] == [A]  # nothing of the first prompt leaks
    assert tree_lists(other.propose(D))[0] == [D, E, F]


def test_share_prompts_adds_the_prompt():
    proposer = make_proposer(share_prompts=True)
    session = open_session(proposer, [A, B])
    session.propose(C)
    session.close()
    assert list(proposer.shared.docs.values()) == [[A, B, C]]


def test_own_text_is_used_like_prompt_lookup():
    proposer = make_proposer(spec_factor=4)
    session = open_session(proposer, [A, B, C, D, X, A])
    tokens, parents = tree_lists(session.propose(B))
    assert tokens == [B, C, D, X] and parents == [-1, 0, 1, 2]
    assert proposer.stats.shared_nodes == 0 and proposer.stats.draft_nodes == 3


def test_shared_store_is_bounded_and_reset_empties_it():
    proposer = make_proposer(max_shared_tokens=5)
    for start in range(0, 30, 3):
        proposer.publish([start, start + 1, start + 2])
    assert proposer.shared.num_tokens <= 5 and len(proposer.shared.docs) == 1
    proposer.reset()
    assert proposer.shared.num_tokens == 0 and not proposer.shared.ends


def test_no_match_gives_the_root_alone():
    tokens, parents = tree_lists(open_session(make_proposer(), [A, B]).propose(C))
    assert tokens == [C] and parents == [-1]


def test_static_mode_is_refused():
    with pytest.raises(ValueError, match="suffix drafting cannot fill a static tree"):
        make_proposer(mode=TreeMode.STATIC)


def test_heaviest_nodes_are_ancestor_closed():
    trie = WeightedTrie(A)
    trie.add([B, C, D], 1.0, False)
    trie.add([B, E], 1.0, True)
    trie.add([C], 1.5, True)
    kept = trie.heaviest(3, 0.0)
    assert [trie.tokens[n] for n in kept] == [B, C, C]  # B (2), C at depth 1 (1.5), C below B (1)
    assert all(trie.parents[n] == 0 or trie.parents[n] in kept for n in kept)


def test_sampled_requests_draft_from_their_own_text_only():
    # a seeded sampled request must not depend on what other requests left in the store
    proposer = make_proposer(spec_factor=4)
    proposer.publish([C, D, E])
    sampled = open_session(proposer, [C, G, A], LogitsParams(temperature=0.7))
    assert tree_lists(sampled.propose(C))[0] == [C, G, A, C]  # own text only, not D E
    sampled.propose(B)
    sampled.close()  # its output is still shared with later greedy requests
    assert list(proposer.shared.docs.values())[-1] == [C, B]
    assert tree_lists(open_session(proposer, [X]).propose(C))[0][:2] == [C, B]
