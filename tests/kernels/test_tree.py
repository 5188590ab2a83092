import pytest
import torch

from specserve.kernels.tree import DraftTree, additive_mask, chain_tree, stack_trees, worth_packing

# 0 -> {1, 2}, 1 -> {3, 4}
TOKENS = [[7, 3, 9, 4, 5]]
PARENTS = [[-1, 0, 0, 1, 1]]


def example_tree() -> DraftTree:
    return DraftTree.from_parents(torch.tensor(TOKENS), torch.tensor(PARENTS))


def brute_ancestors(parents: list[int], i: int) -> set[int]:
    seen = {i}
    while parents[i] >= 0:
        i = parents[i]
        seen.add(i)
    return seen


def test_worked_example_depths_and_ancestors():
    tree = example_tree()
    assert tree.depths.tolist() == [[0, 1, 1, 2, 2]]
    assert tree.ancestors.int().tolist() == [[
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 0, 1],
    ]]
    assert (tree.batch_size, tree.num_nodes, tree.max_depth) == (1, 5, 2)


def test_attention_mask_worked_example():
    mask = example_tree().attention_mask(prefix_len=2, dtype=torch.bfloat16)
    low = torch.finfo(torch.bfloat16).min
    assert mask.shape == (1, 1, 5, 7) and mask.dtype == torch.bfloat16
    allowed = [
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 1, 0, 0],
        [1, 1, 1, 1, 0, 1, 0],
        [1, 1, 1, 1, 0, 0, 1],
    ]
    expected = torch.tensor([[0.0 if a else low for a in row] for row in allowed], dtype=torch.bfloat16)
    assert torch.equal(mask[0, 0], expected)


def test_mask_and_depths_match_brute_force_on_random_trees(random_tree):
    for seed in range(5):
        tree = random_tree(batch=3, nodes=11, vocab=7, seed=seed, max_padding=3)
        mask = tree.attention_mask(prefix_len=4, dtype=torch.float32)
        assert mask.shape == (3, 1, 11, 15)
        assert (mask[:, 0, :, :4] == 0).all()
        for b in range(3):
            parents = tree.parents[b].tolist()
            for i in range(11):
                anc = brute_ancestors(parents, i)
                allowed = [j in anc for j in range(11)]
                assert (mask[b, 0, i, 4:] == 0).tolist() == allowed
                assert tree.depths[b, i].item() == len(anc) - 1


def test_position_ids():
    tree = example_tree()
    assert tree.position_ids(prefix_len=6).tolist() == [[6, 7, 7, 8, 8]]


def test_path_to():
    tree = example_tree()
    assert tree.path_to(torch.tensor([[3, 2]]), width=3).tolist() == [[[0, 1, 3], [0, 2, -1]]]
    assert tree.path_to(torch.tensor([4]), width=3).tolist() == [[0, 1, 4]]


def test_additive_mask_of_one_level_and_of_a_batch():
    allowed = torch.tensor([[True, False], [True, True]])
    mask = additive_mask(allowed, torch.bfloat16)
    low = torch.finfo(torch.bfloat16).min
    assert mask.shape == (1, 1, 2, 2) and mask.dtype == torch.bfloat16
    assert mask[0, 0].tolist() == [[0.0, low], [0.0, 0.0]]
    assert additive_mask(allowed[None].expand(3, -1, -1), torch.float32).shape == (3, 1, 2, 2)


def test_chain_tree():
    chain = chain_tree(torch.tensor([[4, 5, 6, 7]]))
    assert chain.parents.tolist() == [[-1, 0, 1, 2]]
    assert chain.depths.tolist() == [[0, 1, 2, 3]]
    long_chain = chain_tree(torch.zeros(2, 37, dtype=torch.long))  # 6 pointer-jumping rounds
    assert long_chain.depths.tolist() == [list(range(37))] * 2
    assert long_chain.ancestors[0].equal(torch.ones(37, 37, dtype=torch.bool).tril())


def test_single_node_tree():
    tree = DraftTree.from_parents(torch.tensor([[3]]), torch.tensor([[-1]]))
    assert tree.max_depth == 0
    assert tree.attention_mask(2, torch.float32).tolist() == [[[[0.0, 0.0, 0.0]]]]


@pytest.mark.parametrize(
    ("tokens", "parents"),
    [
        ([[1, 2, 3]], [[0, 0, 1]]),  # root parent is not -1
        ([[1, 2, 3]], [[-1, 0, 2]]),  # parent not before the node
        ([[1, 2, 3]], [[-1, -1, 0]]),  # second root
        ([[1, 2, 3]], [[-1, 0]]),  # shape mismatch
    ],
)
def test_from_parents_rejects_bad_input(tokens, parents):
    with pytest.raises(ValueError):
        DraftTree.from_parents(torch.tensor(tokens), torch.tensor(parents))


def test_from_parents_rejects_float_tokens():
    with pytest.raises(ValueError, match="long"):
        DraftTree.from_parents(torch.tensor([[1.0, 2.0]]), torch.tensor([[-1, 0]]))


def test_attention_mask_with_per_row_prefixes_docstring_example():
    tree = DraftTree.from_parents(torch.tensor([[5, 6, 7]]), torch.tensor([[-1, 0, 0]]))
    allowed = tree.attention_mask(torch.tensor([2]), torch.float32, width=6)[0, 0] == 0
    assert allowed.int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0]]
    # two rows with other prefixes: each row sees only its own prefix and its own tree slots
    two = stack_trees([tree, DraftTree.from_parents(torch.tensor([[8, 9]]), torch.tensor([[-1, 0]]))])
    mask = two.attention_mask(torch.tensor([1, 3]), torch.float32, width=6) == 0
    # row 1: root, node 1 and a padding node (parent 0) after a 3-token prefix
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 1]]
    assert two.position_ids(torch.tensor([1, 3])).tolist() == [[1, 2, 2], [3, 4, 4]]


def test_stack_trees_pads_with_nodes_that_hang_off_the_root():
    small = DraftTree.from_parents(torch.tensor([[4, 5]]), torch.tensor([[-1, 0]]))
    big = DraftTree.from_parents(torch.tensor([[1, 2, 3]]), torch.tensor([[-1, 0, 1]]))
    batch = stack_trees([small, big])
    assert batch.tokens.tolist() == [[4, 5, -1], [1, 2, 3]]
    assert batch.parents.tolist() == [[-1, 0, 0], [-1, 0, 1]]


def test_a_batch_packs_when_a_third_of_it_is_padding_or_any_with_one_call_attention():
    def stacked(*sizes):
        return stack_trees([chain_tree(torch.arange(1, n + 1)[None]) for n in sizes])

    assert stacked(3, 3).packing() is None  # no padding
    assert stacked(4, 3, 4).packing() is None  # 11 real of 12
    packing = stacked(4, 1, 3).packing()  # 8 real of 12
    assert packing.counts == [4, 1, 3] and packing.index.tolist() == [0, 1, 2, 3, 4, 8, 9, 10]
    assert worth_packing(2, 3) and not worth_packing(3, 4)
    # attention that takes the packed batch in one call (the CPU kernel): any padding is left out
    assert stacked(4, 3, 4).packing(one_call=True).counts == [4, 3, 4]
    assert stacked(3, 3).packing(one_call=True) is None
    assert worth_packing(3, 4, one_call=True) and not worth_packing(4, 4, one_call=True)
