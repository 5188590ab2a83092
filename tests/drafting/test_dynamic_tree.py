import math

import torch

from specserve.drafting.dynamic_tree import Candidates, build_dynamic_tree, select_best

V = 8


def table_expand(table):
    """An expand generator from a table: child log-probs depend only on the node's token; it needs no
    model forward, so it yields nothing."""

    def expand(cands, frontier, level):
        yield from ()
        rows = []
        for node in frontier:
            row = torch.full((V,), -30.0)
            for token, p in table.get(cands.tokens[node], {}).items():
                row[token] = math.log(p)
            rows.append(row)
        return torch.stack(rows)

    return expand


def built(tree_builder):
    """Run a tree builder whose expand needs no forward: it must return at once."""
    try:
        next(tree_builder)
    except StopIteration as done:
        return done.value
    raise AssertionError("the builder asked for a forward")


def scores(expand, cands, frontier, level):
    return built(expand(cands, frontier, level))


def test_docstring_example():
    # root 0 -> a=1 (0.9), b=2 (0.37); a -> c=3 (0.82), d=4 (0.135); b -> e=5 (0.74), f=6 (0.05)
    table = {0: {1: 0.9, 2: 0.37}, 1: {3: 0.82, 4: 0.135}, 2: {5: 0.74, 6: 0.05}}
    tree = built(build_dynamic_tree(0, table_expand(table), branching=2, depth=2, budget=3, device=torch.device("cpu")))
    assert tree.tokens[0].tolist() == [0, 1, 2, 3]
    assert tree.parents[0].tolist() == [-1, 0, 0, 1]


def test_budget_larger_than_candidates_keeps_all_and_is_connected():
    table = {t: {(t + 1) % V: 0.6, (t + 2) % V: 0.3} for t in range(V)}
    tree = built(build_dynamic_tree(0, table_expand(table), branching=2, depth=3, budget=100,
                                    device=torch.device("cpu")))
    # depth 3, branching 2: 2 + 4 + 4 candidates (only the best 2 of level 2 are expanded)
    assert tree.num_nodes == 1 + 2 + 4 + 4
    parents = tree.parents[0].tolist()
    assert all(parents[i] < i for i in range(1, len(parents)))
    assert tree.depths[0].max().item() == 3


def test_chain_when_top_k_is_one():
    table = {t: {(t + 3) % V: 0.5} for t in range(V)}
    tree = built(build_dynamic_tree(1, table_expand(table), branching=1, depth=4, budget=4, device=torch.device("cpu")))
    assert tree.tokens[0].tolist() == [1, 4, 7, 2, 5]
    assert tree.parents[0].tolist() == [-1, 0, 1, 2, 3]


def full_growth_tree(root, expand, branching, depth, budget):
    """Reference: grow every level (no early stop), then keep the best `budget` nodes."""
    cands = Candidates([root], [-1], [0.0], [0])
    frontier = [0]
    for level in range(depth):
        top_logp, top_tok = scores(expand, cands, frontier, level).clamp(max=0.0).topk(branching, dim=-1)
        new = [n for row, parent in enumerate(frontier)
               for n in cands.add_children(parent, top_tok[row].tolist(), top_logp[row].tolist())]
        frontier = sorted(new, key=lambda i: -cands.scores[i])[:branching]
    return select_best(cands, budget, torch.device("cpu"))


def test_early_stop_keeps_the_full_growth_tree_and_skips_forwards():
    generator = torch.Generator().manual_seed(0)
    skipped = 0
    for trial in range(200):
        # peaked or flat random children, with ties from rounding to 1 decimal
        sharpness = 6.0 if trial % 2 else 0.5
        logits = (torch.randn(V, V, generator=generator) * sharpness).round(decimals=1)
        table = {t: dict(enumerate(logits[t].softmax(-1).tolist())) for t in range(V)}
        branching, depth, budget = 1 + trial % 3, 2 + trial % 5, 1 + trial % 9
        calls = []
        expand = table_expand(table)
        tree = built(build_dynamic_tree(0, lambda c, f, lvl: calls.append(lvl) or expand(c, f, lvl),
                                  branching, depth, budget, torch.device("cpu")))
        reference = full_growth_tree(0, expand, branching, depth, budget)
        assert tree.tokens.tolist() == reference.tokens.tolist()
        assert tree.parents.tolist() == reference.parents.tolist()
        skipped += depth - len(calls)
    assert skipped > 0  # the early stop fires on some of these trees


def test_early_stop_on_a_flat_first_level():
    # root -> 4 equally likely children; budget 3 is filled at level 0, deeper nodes score lower
    table = {0: {1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}, **{t: {5: 0.9} for t in range(1, 5)}}
    levels = []
    expand = table_expand(table)
    tree = built(build_dynamic_tree(0, lambda c, f, lvl: levels.append(lvl) or expand(c, f, lvl),
                              branching=4, depth=5, budget=3, device=torch.device("cpu")))
    assert levels == [0]
    assert tree.parents[0].tolist() == [-1, 0, 0, 0]  # three of the four tied children


def test_static_preset_docstring_example():
    from specserve.drafting.static_trees import build_static_tree

    table = {0: {1: 0.6, 2: 0.3}, 1: {3: 0.9}}
    tree = built(build_static_tree(0, table_expand(table), ((0,), (1,), (0, 0)), torch.device("cpu")))
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


def test_shape_tree_follows_the_budget_mode():
    from specserve.drafting.budget import TreeBudget, TreeMode
    from specserve.drafting.shaper import shape_tree

    table = {0: {1: 0.6, 2: 0.3}, 1: {3: 0.9, 4: 0.05}, 2: {5: 0.9}, 3: {6: 0.9}}
    cpu = torch.device("cpu")
    chain = built(shape_tree(0, table_expand(table), TreeBudget(depth=3, mode=TreeMode.CHAIN), cpu))
    assert chain.tokens[0].tolist() == [0, 1, 3, 6] and chain.parents[0].tolist() == [-1, 0, 1, 2]
    dynamic = built(shape_tree(0, table_expand(table), TreeBudget(depth=2, branching=2, draft_nodes=3), cpu))
    assert dynamic.tokens[0].tolist() == [0, 1, 2, 3]  # 1 (0.6), 3 (0.54), 2 (0.3)
    static = built(shape_tree(0, table_expand(table), TreeBudget(mode=TreeMode.STATIC, preset="small-8"), cpu))
    assert static.num_nodes == 9  # the preset's 8 draft nodes and the root


def test_level_mask_docstring_example():
    from specserve.drafting.dynamic_tree import Candidates
    from specserve.drafting.shaper import level_mask

    # root 0 -> node 1 -> node 2; nodes 4 (child of 1) and 5 (child of 2) form the new level
    cands = Candidates([9, 1, 2, 3, 4, 5], [-1, 0, 1, 0, 1, 2], [0.0] * 6, [0, 1, 2, 1, 2, 3])
    allowed = level_mask(cands, [4, 5], {1: 3, 2: 4}, committed=3, cache_len=5, device=torch.device("cpu"))
    assert allowed.int().tolist() == [[1, 1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 0, 1]]
