import math

import torch

from specserve.drafting.dynamic_tree import build_dynamic_tree

V = 8


def table_expand(table):
    """An expand callback from a table: child log-probs depend only on the node's token."""

    def expand(cands, frontier, level):
        rows = []
        for node in frontier:
            row = torch.full((V,), -30.0)
            for token, p in table.get(cands.tokens[node], {}).items():
                row[token] = math.log(p)
            rows.append(row)
        return torch.stack(rows)

    return expand


def test_docstring_example():
    # root 0 -> a=1 (0.9), b=2 (0.37); a -> c=3 (0.82), d=4 (0.135); b -> e=5 (0.74), f=6 (0.05)
    table = {0: {1: 0.9, 2: 0.37}, 1: {3: 0.82, 4: 0.135}, 2: {5: 0.74, 6: 0.05}}
    tree = build_dynamic_tree(0, table_expand(table), top_k=2, depth=2, budget=3, device=torch.device("cpu"))
    assert tree.tokens[0].tolist() == [0, 1, 2, 3]
    assert tree.parents[0].tolist() == [-1, 0, 0, 1]


def test_budget_larger_than_candidates_keeps_all_and_is_connected():
    table = {t: {(t + 1) % V: 0.6, (t + 2) % V: 0.3} for t in range(V)}
    tree = build_dynamic_tree(0, table_expand(table), top_k=2, depth=3, budget=100, device=torch.device("cpu"))
    # depth 3, top_k 2: 2 + 4 + 4 candidates (only the best 2 of level 2 are expanded)
    assert tree.num_nodes == 1 + 2 + 4 + 4
    parents = tree.parents[0].tolist()
    assert all(parents[i] < i for i in range(1, len(parents)))
    assert tree.depths[0].max().item() == 3


def test_chain_when_top_k_is_one():
    table = {t: {(t + 3) % V: 0.5} for t in range(V)}
    tree = build_dynamic_tree(1, table_expand(table), top_k=1, depth=4, budget=4, device=torch.device("cpu"))
    assert tree.tokens[0].tolist() == [1, 4, 7, 2, 5]
    assert tree.parents[0].tolist() == [-1, 0, 1, 2, 3]


def test_static_preset_docstring_example():
    from specserve.drafting.static_trees import build_static_tree

    table = {0: {1: 0.6, 2: 0.3}, 1: {3: 0.9}}
    tree = build_static_tree(0, table_expand(table), ((0,), (1,), (0, 0)), torch.device("cpu"))
    assert tree.tokens[0].tolist() == [0, 1, 2, 3]
    assert tree.parents[0].tolist() == [-1, 0, 0, 1]


def test_presets_are_trees_of_the_advertised_size():
    import pytest

    from specserve.drafting.static_trees import PRESETS, validate_preset

    for name, paths in PRESETS.items():
        validate_preset(paths)
        assert len(paths) == int(name.rsplit("-", 1)[1])
        assert len(set(paths)) == len(paths)
    with pytest.raises(ValueError):
        validate_preset(((0,), (1, 0)))  # (1,) missing
