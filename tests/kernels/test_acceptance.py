import torch
from scipy.stats import chisquare

from specserve.kernels.acceptance import (
    _triton_kernels,
    chain_sample_accept,
    greedy_accept,
    tree_sample_accept,
    tree_sample_accept_given_noise,
)
from specserve.kernels.sampling import process_logits, sample
from specserve.kernels.tree import DraftTree


def tree(tokens, parents) -> DraftTree:
    return DraftTree.from_parents(torch.tensor(tokens), torch.tensor(parents))


def logits_with_argmax(argmax: list[list[int]], vocab: int) -> torch.Tensor:
    """[B, N, V] logits whose argmax at node i of row b is argmax[b][i]."""
    logits = torch.zeros(len(argmax), len(argmax[0]), vocab)
    logits.scatter_(2, torch.tensor(argmax)[..., None], 4.0)
    return logits


def one_hot(token: int, vocab: int) -> list[float]:
    return [1.0 if v == token else 0.0 for v in range(vocab)]


def result_lists(result) -> tuple[list, list, list]:
    return result.accepted_nodes.tolist(), result.num_accepted.tolist(), result.emitted_tokens.tolist()


def assert_distribution(samples: torch.Tensor, probs: torch.Tensor, min_pvalue: float = 1e-3) -> None:
    """Chi-square goodness of fit of samples (ids) to probs; zero-probability ids must never occur.

    Cells expecting fewer than 5 hits are pooled, as the chi-square approximation needs.
    """
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.flatten().double() / probs.sum() * samples.numel()
    assert counts[expected == 0].sum() == 0
    big, small = expected >= 5, (expected > 0) & (expected < 5)
    observed, wanted = counts[big], expected[big]
    if small.any():
        observed = torch.cat([observed, counts[small].sum()[None]])
        wanted = torch.cat([wanted, expected[small].sum()[None]])
    wanted = wanted * observed.sum() / wanted.sum()
    assert chisquare(observed.numpy(), wanted.numpy()).pvalue > min_pvalue


# ---------------------------------------------------------------- greedy


def test_greedy_worked_example():
    example = tree([[7, 3, 9, 4, 5]], [[-1, 0, 0, 1, 1]])
    result = greedy_accept(example, logits_with_argmax([[3, 5, 1, 8, 2]], vocab=10))
    assert result_lists(result) == ([[0, 1, 4]], [2], [[3, 5, 2]])


def test_greedy_batch_rows_differ():
    batch = tree(
        [[7, 3, 9, 4, 5], [7, 3, 9, 4, 5], [1, 2, 3, 4, -1]],
        [[-1, 0, 0, 1, 1], [-1, 0, 0, 1, 1], [-1, 0, 1, 2, 0]],  # row 2: chain of 3 + a padding node
    )
    argmax = [[3, 5, 1, 8, 2], [0, 5, 1, 8, 2], [2, 3, 4, 6, 0]]
    result = greedy_accept(batch, logits_with_argmax(argmax, vocab=10))
    assert result_lists(result) == (
        [[0, 1, 4, -1], [0, -1, -1, -1], [0, 1, 2, 3]],
        [2, 0, 3],
        [[3, 5, 2, -1], [0, -1, -1, -1], [2, 3, 4, 6]],
    )


def test_greedy_ties_pick_lowest_node_index():
    # Duplicate siblings 1 and 2 (token 5) both match, and so do their children 3 and 4.
    dup = tree([[0, 5, 5, 6, 6]], [[-1, 0, 0, 2, 1]])
    result = greedy_accept(dup, logits_with_argmax([[5, 6, 6, 1, 2]], vocab=8))
    assert result_lists(result) == ([[0, 2, 3]], [2], [[5, 6, 1]])


def test_greedy_padding_never_accepted():
    padded = tree([[0, -1, -1]], [[-1, 0, 0]])
    result = greedy_accept(padded, torch.randn(1, 3, 4))
    assert result.num_accepted.tolist() == [0]
    assert result.accepted_nodes.tolist() == [[0, -1]]


def test_greedy_float64_and_bfloat16_agree():
    example = tree([[7, 3, 9, 4, 5]], [[-1, 0, 0, 1, 1]])
    logits = logits_with_argmax([[3, 5, 1, 8, 2]], vocab=10)
    logits[0, 4, 7] = 3.0  # runner-up, exactly representable in bfloat16
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert result_lists(greedy_accept(example, logits.to(dtype))) == ([[0, 1, 4]], [2], [[3, 5, 2]])


def brute_greedy(tokens: list[int], parents: list[int], argmax: list[int]) -> tuple[list[int], list[int]]:
    """Path and emitted tokens by checking every node's path in python."""
    best_path = [0]
    for node in range(1, len(tokens)):
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path.reverse()
        if all(tokens[n] == argmax[parents[n]] for n in path[1:]) and len(path) > len(best_path):
            best_path = path
    return best_path, [tokens[n] for n in best_path[1:]] + [argmax[best_path[-1]]]


def test_greedy_matches_brute_force_on_random_trees(random_tree):
    for seed in range(8):
        trees = random_tree(batch=16, nodes=12, vocab=3, seed=seed, max_padding=3)
        logits = torch.randn(16, 12, 3, generator=torch.Generator().manual_seed(100 + seed))
        result = greedy_accept(trees, logits)
        for b in range(16):
            argmax = logits[b].argmax(-1).tolist()
            path, emitted = brute_greedy(trees.tokens[b].tolist(), trees.parents[b].tolist(), argmax)
            n = len(path)
            assert result.accepted_nodes[b, :n].tolist() == path
            assert (result.accepted_nodes[b, n:] == -1).all()
            assert result.num_accepted[b].item() == n - 1
            assert result.emitted_tokens[b, :n].tolist() == emitted


def test_cpu_tensors_use_torch():
    assert _triton_kernels(torch.zeros(1)) is None


# ---------------------------------------------------------------- tree sampling

# 0 -> {1: tok 2, 2: tok 1}, 1 -> {3: tok 0}, 2 -> {4: tok 3}
SAMPLE_TOKENS = [[0, 2, 1, 0, 3]]
SAMPLE_PARENTS = [[-1, 0, 0, 1, 2]]


def test_tree_sample_one_hot_targets_are_deterministic():
    tokens = SAMPLE_TOKENS * 3 + [[0, -1, -1, -1, -1]]  # row 3: padding only
    parents = SAMPLE_PARENTS * 3 + [[-1, 0, 0, 0, 0]]
    uniform = [0.25] * 4
    probs = torch.tensor([
        # row 0: root wants 1 (node 2), node 2 wants 3 (node 4), leaf 4 gives bonus 2
        [one_hot(1, 4), one_hot(0, 4), one_hot(3, 4), one_hot(0, 4), one_hot(2, 4)],
        # row 1: root wants 3, no child has it: recovered token 3
        [one_hot(3, 4), uniform, uniform, uniform, uniform],
        # row 2: root accepts node 1 (token 2) surely, node 1 rejects node 3: recovered 1
        [one_hot(2, 4), one_hot(1, 4), uniform, uniform, uniform],
        # row 3: padding (token -1) must not be accepted even though token 0 has all the mass
        [one_hot(0, 4)] * 5,
    ])
    expected = (
        [[0, 2, 4], [0, -1, -1], [0, 1, -1], [0, -1, -1]],
        [2, 0, 1, 0],
        [[1, 3, 2], [3, -1, -1], [2, 1, -1], [0, -1, -1]],
    )
    for seed in range(5):
        result = tree_sample_accept(tree(tokens, parents), probs, torch.Generator().manual_seed(seed))
        assert result_lists(result) == expected


def test_tree_sample_given_noise_worked_example():
    # 0 -> {1: tok 2, 2: tok 2 (duplicate), 3: tok 1}, 3 -> {4: tok 0}
    dup = tree([[0, 2, 2, 1, 0]], [[-1, 0, 0, 0, 3]])
    probs = torch.tensor([[[0.1, 0.6, 0.3, 0.0]] + [[0.25] * 4] * 4])
    accept_u = torch.zeros(1, 2, 5)
    accept_u[0, 0, 1] = 0.5  # node 1: 0.5 >= p(2) = 0.3 -> rejected, p(2) := 0
    accept_u[0, 0, 2] = 0.0  # node 2: same token, now probability 0 -> rejected even for u = 0
    accept_u[0, 0, 3] = 0.8  # node 3: 0.8 < 0.6 / 0.7 -> accepted
    accept_u[0, 1, 4] = 0.3  # node 4: 0.3 >= 0.25 -> rejected; residual [0, .25, .25, .25]
    noise = torch.tensor([[0.1, 1.0, 0.5, 1.0]])  # race scores [0, .25, .5, .25]: token 0 was zeroed
    result = tree_sample_accept_given_noise(dup, probs, accept_u, noise)
    assert result_lists(result) == ([[0, 3, -1]], [1], [[1, 2, -1]])


def target_tables(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A toy target: P1 [V] at the root, P2 [V, V] given the first token, P3 [V, V] given the second.

    Processed with temperature and top-p, so some tokens have probability exactly 0.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1 + 2 * vocab, vocab, generator=gen)
    probs = process_logits(logits, temperature=0.7, top_p=0.95)
    return probs[0], probs[1 : 1 + vocab], probs[1 + vocab :]


def second_tokens(first: torch.Tensor, result, table: torch.Tensor, generator) -> torch.Tensor:
    """The second emitted token; rows that emitted one token take it from the next step's target."""
    next_step = sample(table[first], generator)
    return torch.where(result.num_accepted >= 1, result.emitted_tokens[:, 1], next_step)


def test_tree_sample_reproduces_target_distribution():
    vocab, trials = 5, 30000
    p1, p2, p3 = target_tables(vocab, seed=3)
    a, b = p1.argsort(descending=True)[:2].tolist()
    c = p2[a].argmax().item()
    # Duplicate siblings at both levels, a branch on the second most likely token, a padding node.
    tokens = [0, a, a, b, c, c, p2[b].argmax().item(), -1]
    parents = [-1, 0, 0, 0, 1, 1, 3, 0]
    node_probs = torch.stack([p1, p2[a], p2[a], p2[b], p3[c], p3[c], p3[tokens[6]], p1])
    trees = tree([tokens] * trials, [parents] * trials)
    gen = torch.Generator().manual_seed(0)
    result = tree_sample_accept(trees, node_probs.expand(trials, -1, -1), gen)
    first = result.emitted_tokens[:, 0]
    assert_distribution(first, p1)
    second = second_tokens(first, result, p2, gen)
    assert_distribution(first * vocab + second, p1[:, None] * p2)
    # The test exercised acceptance at both depths and recovery; duplicates and padding never won.
    depth = result.num_accepted
    assert (depth == 0).float().mean() > 0.05 and (depth == 2).float().mean() > 0.05
    assert not torch.isin(result.accepted_nodes, torch.tensor([2, 5, 7])).any()


def test_tree_sample_is_seeded():
    probs = torch.softmax(torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(1)), -1)
    trees = tree(SAMPLE_TOKENS * 6, SAMPLE_PARENTS * 6)
    runs = [tree_sample_accept(trees, probs, torch.Generator().manual_seed(s)) for s in (9, 9)]
    assert result_lists(runs[0]) == result_lists(runs[1])
    many = [result_lists(tree_sample_accept(trees, probs, torch.Generator().manual_seed(s))) for s in range(6)]
    assert len({str(r) for r in many}) > 1


def test_tree_sample_generator_per_row_matches_single_rows():
    probs = torch.softmax(torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2)), -1)
    pair = tree(SAMPLE_TOKENS * 2, SAMPLE_PARENTS * 2)
    both = tree_sample_accept(pair, probs, [torch.Generator().manual_seed(s) for s in (11, 12)])
    for row, seed in enumerate((11, 12)):
        alone = tree_sample_accept(tree(SAMPLE_TOKENS, SAMPLE_PARENTS), probs[row : row + 1],
                                   torch.Generator().manual_seed(seed))
        assert both.emitted_tokens[row].tolist() == alone.emitted_tokens[0].tolist()


# ---------------------------------------------------------------- chain sampling


def test_chain_sample_literal_cases():
    vocab = 4
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [3, -1, -1]])
    q = torch.tensor([[one_hot(t, vocab) for t in (1, 2, 3)]] * 2 + [[one_hot(3, vocab)] * 3])
    p = torch.tensor([
        # row 0: x_0 = 1 accepted surely; x_1 = 2 has p = 0: recovered from max(0, p - q) = one-hot(0)
        [one_hot(1, vocab), one_hot(0, vocab), one_hot(0, vocab), one_hot(0, vocab)],
        # row 1: p == q: all accepted, bonus from p_3
        [one_hot(1, vocab), one_hot(2, vocab), one_hot(3, vocab), one_hot(2, vocab)],
        # row 2: x_0 accepted, then padding: recovered from p_1 itself
        [one_hot(3, vocab), one_hot(1, vocab), one_hot(0, vocab), one_hot(0, vocab)],
    ])
    result = chain_sample_accept(draft, q, p, torch.Generator().manual_seed(0))
    assert result_lists(result) == (
        [[0, 1, -1, -1], [0, 1, 2, 3], [0, 1, -1, -1]],
        [1, 3, 1],
        [[1, 0, -1, -1], [1, 2, 3, 2], [3, 1, -1, -1]],
    )


def test_chain_sample_padding_recovers_from_p_not_p_minus_q():
    rows = 200
    draft = torch.tensor([[3, -1]] * rows)
    q = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]] * rows)
    p = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]] * rows)
    result = chain_sample_accept(draft, q, p, torch.Generator().manual_seed(0))
    assert (result.num_accepted == 1).all()
    assert set(result.emitted_tokens[:, 1].tolist()) == {1, 2}  # max(0, p - q) would only give 2


def test_chain_sample_reproduces_target_distribution():
    vocab, trials = 5, 30000
    p1, p2, p3 = target_tables(vocab, seed=5)
    gen = torch.Generator().manual_seed(1)
    # An arbitrary draft: its own tables, top-k cut so q misses tokens the target likes.
    q_logits = torch.randn(1 + vocab, vocab, generator=gen)
    q = process_logits(q_logits, temperature=1.0, top_k=3)
    x0 = sample(q[0].expand(trials, -1), gen)
    x1 = sample(q[1:][x0], gen)
    draft_probs = torch.stack([q[0].expand(trials, -1), q[1:][x0]], dim=1)
    target_probs = torch.stack([p1.expand(trials, -1), p2[x0], p3[x1]], dim=1)
    result = chain_sample_accept(torch.stack([x0, x1], dim=1), draft_probs, target_probs, gen)
    first = result.emitted_tokens[:, 0]
    assert_distribution(first, p1)
    assert_distribution(first * vocab + second_tokens(first, result, p2, gen), p1[:, None] * p2)
    assert (result.num_accepted == 0).any() and (result.num_accepted == 2).any()


def test_chain_sample_is_seeded():
    gen = torch.Generator().manual_seed(4)
    q = torch.softmax(torch.randn(8, 3, 6, generator=gen), -1)
    p = torch.softmax(torch.randn(8, 4, 6, generator=gen), -1)
    draft = torch.randint(0, 6, (8, 3), generator=gen)
    first = chain_sample_accept(draft, q, p, torch.Generator().manual_seed(5))
    second = chain_sample_accept(draft, q, p, torch.Generator().manual_seed(5))
    assert result_lists(first) == result_lists(second)
