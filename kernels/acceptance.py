"""Lossless acceptance rules: which draft tokens the target agrees with, plus one token of its own.

Vocabulary (as in vLLM's rejection sampler):

- ACCEPTED tokens: the draft tokens on the chosen root-to-node path; the target keeps them.
- BONUS token: the one token the target contributes after the last accepted node. Sampled from the
  target at that node if the walk reached a leaf (or from its argmax when greedy); if the walk stopped
  because every child was rejected, it is the RECOVERED token, sampled from the residual distribution
  that excludes what was rejected. It becomes the next step's root.

Every rule returns an `AcceptResult` and synchronises with the host at most once (for the tree's
depth, which `DraftTree` caches). On CUDA with triton installed, `greedy_accept` and
`tree_sample_accept` run the kernels of `triton_acceptance`; everywhere else the torch code below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from specserve.kernels.sampling import Generators, race, random_exponential, random_uniform
from specserve.kernels.tree import PAD_TOKEN, DraftTree


@dataclass(frozen=True, eq=False)
class AcceptResult:
    """Outcome of one verify step for a batch; D = the tree's max depth.

    Column j of `accepted_nodes` and of `emitted_tokens` line up: emitted_tokens[b, j] was produced by
    the target at node accepted_nodes[b, j] (so its logprobs come from that node's logits).
    """

    accepted_nodes: Tensor  # [B, D+1] root (0) then the accepted draft nodes, -1 padded
    num_accepted: Tensor  # [B] long, accepted DRAFT tokens (root and bonus excluded)
    emitted_tokens: Tensor  # [B, D+1] accepted draft tokens then the bonus token, -1 padded


def greedy_accept(tree: DraftTree, logits: Tensor) -> AcceptResult:
    """Temperature-0 acceptance: a child is accepted iff it equals the target's argmax at its parent.

    logits: [B, N, V] target logits at every tree node (any float dtype).
    Keeps the deepest node whose whole path matches (ties: lowest node index); bonus = argmax there.

    Example (V=10; tree: 0 -> {1, 2}, 1 -> {3, 4})::

        tokens = [[7, 3, 9, 4, 5]]   argmax per node = [[3, 5, 1, 8, 2]]
        node 1 (3 == argmax at 0) ok, node 2 (9 != 3) no, node 3 (4 != 5) no, node 4 (5 == 5) ok
        -> accepted_nodes [[0, 1, 4]], num_accepted [2], emitted_tokens [[3, 5, 2]]
    """
    if (kernels := _triton_kernels(logits)) is not None:
        return kernels.greedy_accept(tree, logits)
    target = logits.argmax(dim=-1)  # [B, N]
    # Padding tokens (-1) never equal an argmax, so they are never accepted.
    match = tree.tokens == target.gather(1, tree.parents.clamp(min=0))
    match[:, 0] = True
    path_ok = ~(tree.ancestors & ~match[:, None, :]).any(dim=-1)  # every ancestor-or-self matched
    # argmax returns the first maximum: the lowest node index among the deepest.
    last = torch.where(path_ok, tree.depths, -1).argmax(dim=-1)
    return assemble_result(tree, last, target.gather(1, last[:, None])[:, 0])


def tree_sample_accept(tree: DraftTree, probs: Tensor, generator: Generators = None) -> AcceptResult:
    """Lossless sampling acceptance for one-hot drafts (tree children picked by top-k, EAGLE/MSD).

    probs: [B, N, V] target distribution at every node, already processed (temperature, top-k,
    top-p), so the bonus token gets the same processing as every other token.
    From the root, try the current node's children in node-index order: accept child x with
    probability p(x), where p is the residual at that node; on reject set p(x) = 0, renormalise and
    try the next child (a duplicate sibling token is then rejected surely). On acceptance move to
    the child and repeat. If all children are rejected the bonus is RECOVERED from the residual; at a
    leaf it is sampled from the leaf's p. Each emitted token is then distributed exactly as the target.
    """
    batch, _, vocab = probs.shape
    accept_u = random_uniform((batch, tree.max_depth, tree.num_nodes), generator, probs.device)
    bonus_noise = random_exponential((batch, vocab), generator, probs.device)
    if (kernels := _triton_kernels(probs)) is not None:
        return kernels.tree_sample_accept_given_noise(tree, probs, accept_u, bonus_noise)
    return tree_sample_accept_given_noise(tree, probs, accept_u, bonus_noise)


def tree_sample_accept_given_noise(
    tree: DraftTree,
    probs: Tensor,  # [B, N, V] processed target distributions
    accept_u: Tensor,  # [B, D, N] uniforms: [b, d, i] decides child i when the walk is at depth d
    bonus_noise: Tensor,  # [B, V] Exp(1) noise for the bonus token's exponential race
) -> AcceptResult:
    """`tree_sample_accept` with its randomness given, so torch and Triton can be compared exactly.

    Example (V=4; tree 0 -> {1: tok 2, 2: tok 2, 3: tok 1}, 3 -> {4: tok 0}; p = [.1, .6, .3, 0] at
    the root, uniform at node 3)::

        depth 0: node 1 u=0.5 >= p(2)=0.3 rejected, p(2) := 0; node 2 (token 2 again) has
                 probability 0; node 3 u=0.8 < 0.6 / 0.7 accepted
        depth 1: node 4 u=0.3 >= 0.25 rejected -> residual [0, .25, .25, .25]
        bonus_noise [0.1, 1, 0.5, 1] -> race scores [0, .25, .5, .25] -> recovered token 2
        -> accepted_nodes [[0, 3, -1]], num_accepted [1], emitted_tokens [[1, 2, -1]]
    """
    rows = torch.arange(tree.batch_size, device=probs.device)
    real = tree.tokens != PAD_TOKEN
    cur = torch.zeros_like(rows)
    walking = torch.ones_like(real[:, 0])
    for depth in range(tree.max_depth):
        children = (tree.parents == cur[:, None]) & real & walking[:, None]
        accept_prob = _sequential_accept_probs(probs[rows, cur], tree.tokens, children)
        hit = children & (accept_u[:, depth] < accept_prob)
        walking = hit.any(dim=-1)
        cur = torch.where(walking, hit.to(torch.uint8).argmax(dim=-1), cur)  # first accepted child
    # The walk stopped at `cur`: either all its children were rejected, or it has none.
    children = (tree.parents == cur[:, None]) & real
    full = probs[rows, cur]
    residual = full.masked_fill(_token_set(tree.tokens, children, full.shape[-1]), 0.0)
    # The residual is empty only if rounding rejected a child whose acceptance probability was 1.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, full)
    return assemble_result(tree, cur, race(residual, bonus_noise))


def chain_sample_accept(
    draft_tokens: Tensor,  # [B, K] long, -1 padded at the end of shorter chains
    draft_probs: Tensor,  # [B, K, V] q: q[:, i] is the draft distribution x_i was sampled from
    target_probs: Tensor,  # [B, K+1, V] p: p[:, i] is the processed target distribution at node i
    generator: Generators = None,
) -> AcceptResult:
    """Standard speculative sampling (Leviathan et al. 2023) of a chain drafted from q.

    Draft token x_i (column i, node i+1 of the chain [root, x_0, .., x_{K-1}]) is accepted with
    probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection, at position i, the RECOVERED token
    is sampled from norm(max(0, p_i - q_i)); if all K are accepted the bonus comes from p_K.
    A padding position counts as a rejection whose recovered token comes from p_i alone (no draft
    was proposed there).

    Example (K=2, uniforms u = [0.7, 0.6])::

        x = [[2, 0]], q(x) = [0.5, 0.8], p(x) = [0.4, 0.2]
        x_0: 0.7 < 0.4 / 0.5 -> accepted;  x_1: 0.6 >= 0.2 / 0.8 -> rejected
        -> accepted_nodes [[0, 1, -1]], num_accepted [1], emitted [[2, r, -1]], r ~ norm(max(0, p_1 - q_1))
    """
    batch, k, vocab = draft_probs.shape
    accept_u = random_uniform((batch, k), generator, draft_probs.device)
    bonus_noise = random_exponential((batch, vocab), generator, draft_probs.device)
    real = draft_tokens != PAD_TOKEN
    index = draft_tokens.clamp(min=0)[..., None]
    p_x = target_probs[:, :k].gather(-1, index)[..., 0]
    q_x = draft_probs.gather(-1, index)[..., 0]
    # u < p / q written without the division: p >= q accepts surely, p = 0 never does.
    accepted = real & (accept_u * q_x < p_x)
    num = accepted.to(torch.long).cumprod(dim=-1).sum(dim=-1)  # the leading run of acceptances
    excess = (target_probs[:, :k] - draft_probs).clamp_min(0.0)
    residual = torch.where(real[..., None], excess, target_probs[:, :k])
    residual = torch.cat([residual, target_probs[:, k:]], dim=1)  # position K: the plain bonus
    rows = torch.arange(batch, device=draft_probs.device)
    stop, full = residual[rows, num], target_probs[rows, num]
    # An empty residual (p == q up to rounding) is reached with probability 0.
    stop = torch.where(stop.sum(dim=-1, keepdim=True) > 0, stop, full)
    column = torch.arange(k + 1, device=draft_tokens.device)
    nodes = torch.where(column <= num[:, None], column, -1)
    return _result(nodes, num, draft_tokens, race(stop, bonus_noise))


def assemble_result(tree: DraftTree, last: Tensor, bonus: Tensor) -> AcceptResult:
    """Build the result from the last accepted node [B] and the bonus token [B].

    Example (tree of `greedy_accept`, last = [4], bonus = [2])::

        accepted_nodes [[0, 1, 4]], num_accepted [2], emitted_tokens [[3, 5, 2]]
    """
    nodes = tree.path_to(last, tree.max_depth + 1)  # [B, D+1]
    num = tree.depths.gather(1, last[:, None])[:, 0]
    drafted = tree.tokens.gather(1, nodes[:, 1:].clamp(min=0))  # [B, D]: column j = token of node j+1
    return _result(nodes, num, drafted, bonus)


def _result(nodes: Tensor, num: Tensor, drafted: Tensor, bonus: Tensor) -> AcceptResult:
    """nodes [B, W], num [B], drafted [B, W-1] tokens along the path, bonus [B] -> AcceptResult."""
    column = torch.arange(nodes.shape[1], device=nodes.device)
    emitted = torch.where(column < num[:, None], F.pad(drafted, (0, 1), value=-1), -1)
    emitted = torch.where(column == num[:, None], bonus[:, None], emitted)
    return AcceptResult(accepted_nodes=nodes, num_accepted=num, emitted_tokens=emitted)


def _sequential_accept_probs(p: Tensor, tokens: Tensor, children: Tensor) -> Tensor:
    """[B, N] probability that each child is accepted IF the walk gets to try it.

    p: [B, V] distribution at the current node; tokens: [B, N]; children: [B, N] bool.
    Trying children in index order and zeroing each rejected token gives child i the probability
    p(x_i) / (1 - mass of the distinct tokens of earlier children), and 0 if an earlier child already
    had the same token. Computed for all children at once.

    Example: p = [0.5, 0.3, 0.2], children tokens (in order) 1, 1, 0 -> [0.3/1, 0, 0.5/0.7]
    """
    p_x = p.gather(1, tokens.clamp(min=0))
    same_token = tokens[:, :, None] == tokens[:, None, :]
    earlier = torch.ones_like(same_token[0]).tril(diagonal=-1)  # [i, j]: j < i
    repeated = (same_token & children[:, None, :] & earlier).any(dim=-1)
    first = children & ~repeated
    mass = torch.where(first, p_x, 0.0)
    before = F.pad(mass.cumsum(dim=-1)[:, :-1], (1, 0))  # mass of the distinct earlier tokens
    remaining = p.sum(dim=-1, keepdim=True) - before
    return torch.where(first, p_x / remaining.clamp_min(torch.finfo(p.dtype).tiny), 0.0)


def _token_set(tokens: Tensor, members: Tensor, vocab: int) -> Tensor:
    """[B, V] bool: which token ids appear among the nodes flagged in members [B, N]."""
    # Non-members write to a spare column V, dropped afterwards.
    index = torch.where(members, tokens, vocab)
    hit = torch.zeros(tokens.shape[0], vocab + 1, dtype=torch.bool, device=tokens.device)
    return hit.scatter_(1, index, True)[:, :vocab]


def _triton_kernels(tensor: Tensor):
    """The Triton module when `tensor` is on CUDA and triton imports, else None (use torch)."""
    if not tensor.is_cuda:
        return None
    try:  # imported lazily: triton is optional and slow to import; CPU never needs it
        from specserve.kernels import triton_acceptance
    except ImportError:
        return None
    return triton_acceptance
