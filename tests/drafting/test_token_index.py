from specserve.drafting.token_index import Match, TokenIndex

A, B, C, D, E, X, Y = 10, 11, 12, 13, 14, 20, 21


def test_docstring_example_match_lengths_past_max_n():
    index = TokenIndex(max_n=2)
    index.extend(0, [A, B, C, E])
    index.extend(1, [X, B, C, D])
    assert index.matches([X, B, C], limit=8) == [Match(1, 2, 3), Match(0, 2, 2)]
    assert index.continuation(Match(1, 2, 3), 5) == [D]


def test_falls_back_to_shorter_ngrams_and_skips_a_match_at_the_end():
    index = TokenIndex(max_n=3)
    index.extend(0, [A, B, C, A, B])
    # "A B" occurs at the end (nothing after: skipped) and at positions 0..1
    assert index.matches([A, B], limit=8) == [Match(0, 1, 2)]
    # "D B" never occurs, "B" does (position 4 is the end: skipped)
    assert index.matches([D, B], limit=8) == [Match(0, 1, 1)]
    assert index.matches([D], limit=8) == []


def test_limit_keeps_the_newest_occurrences():
    index = TokenIndex(max_n=1)
    for doc in range(3):
        index.extend(doc, [A, doc])
    assert [m.doc for m in index.matches([A], limit=2)] == [2, 1]


def test_token_bound_evicts_the_least_recently_used_document():
    index = TokenIndex(max_n=2, max_tokens=6)
    index.extend(0, [A, B])
    index.extend(1, [C, D])
    index.touch(0)  # doc 0 helped a draft: doc 1 goes first
    index.extend(2, [E, X, Y])
    assert list(index.docs) == [0, 2] and index.num_tokens == 5 and index.evicted == 1
    assert index.matches([C], limit=8) == [] and (C, D) not in index.ends
    # a document longer than the bound keeps its tail, alone
    index.extend(3, list(range(100, 110)))
    assert list(index.docs) == [3] and index.docs[3] == list(range(104, 110))
    assert set(index.ends) == {k for k in index.ends if all(t >= 104 for t in k)}
