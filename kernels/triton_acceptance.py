"""Triton kernels for tree acceptance, with the signatures of their torch twins in `acceptance`.

`acceptance.greedy_accept` and `acceptance.tree_sample_accept` call these on CUDA tensors when
triton imports. Importing this module raises ImportError without triton. One program per batch row
walks the tree in registers, so the walk costs no host round trips; only the result assembly
(`acceptance.assemble_result`) and its one host sync are shared with torch.

Tests run the kernels on CPU with TRITON_INTERPRET=1, which must be set before triton itself is
first imported (`triton.jit` reads it when decorating, triton's own library included), so they run in
a fresh process: see tests/kernels/triton_cases.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from specserve.kernels.acceptance import AcceptResult, assemble_result
from specserve.kernels.tree import DraftTree

_MAX_BLOCK_V = 1024  # vocabulary chunk per loop step: bounded so a 150k vocabulary fits registers


@triton.jit
def _argmax_kernel(logits_ptr, out_ptr, V, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """out[row] = argmax(logits[row, :V]), first index on ties, as torch.argmax."""
    row = tl.program_id(0).to(tl.int64)
    best_val = tl.full([], float("-inf"), ACC)
    best_idx = tl.full([], 0, tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_ptr + row * V + offs, mask=offs < V, other=float("-inf")).to(ACC)
        chunk_max = tl.max(x, axis=0)
        chunk_idx = (start + tl.argmax(x, axis=0)).to(tl.int64)
        better = chunk_max > best_val  # strict: an earlier chunk wins ties
        best_idx = tl.where(better, chunk_idx, best_idx)
        best_val = tl.where(better, chunk_max, best_val)
    tl.store(out_ptr + row, best_idx)


@triton.jit
def _pick(vec, offs, i):
    """vec[i] for a register vector (registers cannot be indexed by a runtime value)."""
    return tl.sum(tl.where(offs == i, vec, 0), axis=0)


@triton.jit
def _greedy_walk_kernel(tokens_ptr, parents_ptr, target_ptr, last_ptr, N, BLOCK_N: tl.constexpr):
    """last[b] = deepest node whose path matches the argmax at every parent (lowest index on ties).

    Nodes are in topological order, so one pass sets ok[i] = ok[parent] & (token == argmax at parent).
    """
    base = tl.program_id(0).to(tl.int64) * N
    offs = tl.arange(0, BLOCK_N)
    target = tl.load(target_ptr + base + offs, mask=offs < N, other=-1)
    ok = (offs == 0).to(tl.int32)
    depth = tl.zeros([BLOCK_N], dtype=tl.int32)
    best = tl.full([], 0, tl.int64)
    best_depth = tl.full([], 0, tl.int32)
    for i in range(1, N):
        parent = tl.load(parents_ptr + base + i)
        token = tl.load(tokens_ptr + base + i)
        ok_i = (_pick(ok, offs, parent) > 0) & (token == _pick(target, offs, parent))
        depth_i = _pick(depth, offs, parent) + 1
        ok = tl.where(offs == i, ok_i.to(tl.int32), ok)
        depth = tl.where(offs == i, depth_i, depth)
        better = ok_i & (depth_i > best_depth)  # strict: the lower index wins ties
        best = tl.where(better, i, best)
        best_depth = tl.where(better, depth_i, best_depth)
    tl.store(last_ptr + tl.program_id(0), best)


@triton.jit
def _sample_walk_kernel(
    tokens_ptr, parents_ptr, probs_ptr, accept_u_ptr, noise_ptr, last_ptr, bonus_ptr,
    N, V, D, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """One-hot tree sampling walk for batch row b: see `acceptance.tree_sample_accept`."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    tokens = tl.load(tokens_ptr + b * N + offs, mask=offs < N, other=-1)
    parents = tl.load(parents_ptr + b * N + offs, mask=offs < N, other=-1)
    cur = tl.full([], 0, tl.int64)
    walking = tl.full([], 1, tl.int32)
    for d in range(D):
        row = probs_ptr + (b * N + cur) * V
        total = tl.zeros([], dtype=ACC)
        for start in range(0, V, BLOCK_V):
            offs_v = start + tl.arange(0, BLOCK_V)
            total += tl.sum(tl.load(row + offs_v, mask=offs_v < V, other=0.0).to(ACC), axis=0)
        rejected = tl.zeros([], dtype=ACC)  # mass of the distinct tokens rejected so far
        nxt = cur
        moved = tl.full([], 0, tl.int32)
        for j in range(1, N):
            token = tl.load(tokens_ptr + b * N + j)
            parent = tl.load(parents_ptr + b * N + j)
            child = (parent == cur) & (token != -1) & (walking > 0) & (moved == 0)
            earlier = (offs >= 1) & (offs < j) & (parents == cur) & (tokens == token)
            first = child & (tl.sum(earlier.to(tl.int32), axis=0) == 0)
            p_x = tl.load(row + tl.maximum(token, 0)).to(ACC)
            accept = tl.where(first, p_x / tl.maximum(total - rejected, 1e-38), 0.0)
            u = tl.load(accept_u_ptr + (b * D + d) * N + j)
            hit = first & (u < accept)
            rejected += tl.where(first & (u >= accept), p_x, 0.0)
            nxt = tl.where(hit, j, nxt)
            moved = tl.where(hit, 1, moved)
        walking = walking * moved
        cur = nxt
    bonus = _race_excluding_children(probs_ptr + (b * N + cur) * V, noise_ptr + b * V, tokens, parents,
                                     cur, N, V, BLOCK_N, BLOCK_V, ACC)
    tl.store(last_ptr + b, cur)
    tl.store(bonus_ptr + b, bonus)


@triton.jit
def _race_excluding_children(row, noise, tokens, parents, cur, N, V,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """Exponential race over p at `cur` with its children's tokens zeroed (all of p if that is empty)."""
    offs = tl.arange(0, BLOCK_N)
    child = (offs >= 1) & (offs < N) & (parents == cur) & (tokens != -1)
    best_res = tl.full([], -1.0, ACC)
    best_full = tl.full([], -1.0, ACC)
    idx_res = tl.full([], 0, tl.int64)
    idx_full = tl.full([], 0, tl.int64)
    mass = tl.zeros([], dtype=ACC)
    for start in range(0, V, BLOCK_V):
        offs_v = start + tl.arange(0, BLOCK_V)
        p = tl.load(row + offs_v, mask=offs_v < V, other=0.0).to(ACC)
        e = tl.load(noise + offs_v, mask=offs_v < V, other=1.0).to(ACC)
        rejected = tl.sum((child[None, :] & (tokens[None, :] == offs_v[:, None])).to(tl.int32), axis=1) > 0
        residual = tl.where(rejected, 0.0, p)
        mass += tl.sum(residual, axis=0)
        score_res, score_full = residual / e, p / e
        # Strict comparisons keep the first maximum, as torch.argmax does; -1 makes the first chunk win.
        better = tl.max(score_res, axis=0) > best_res
        idx_res = tl.where(better, (start + tl.argmax(score_res, axis=0)).to(tl.int64), idx_res)
        best_res = tl.where(better, tl.max(score_res, axis=0), best_res)
        better = tl.max(score_full, axis=0) > best_full
        idx_full = tl.where(better, (start + tl.argmax(score_full, axis=0)).to(tl.int64), idx_full)
        best_full = tl.where(better, tl.max(score_full, axis=0), best_full)
    return tl.where(mass > 0, idx_res, idx_full)


def greedy_accept(tree: DraftTree, logits: Tensor) -> AcceptResult:
    """Triton `acceptance.greedy_accept`: logits [B, N, V] -> AcceptResult."""
    batch, n, vocab = logits.shape
    target = torch.empty(batch, n, dtype=torch.long, device=logits.device)
    _argmax_kernel[(batch * n,)](
        logits.contiguous(), target, vocab, BLOCK_V=_block_v(vocab), ACC=_acc_dtype(logits)
    )
    last = torch.empty(batch, dtype=torch.long, device=logits.device)
    _greedy_walk_kernel[(batch,)](
        tree.tokens.contiguous(), tree.parents.contiguous(), target, last, n,
        BLOCK_N=triton.next_power_of_2(n),
    )
    return assemble_result(tree, last, target.gather(1, last[:, None])[:, 0])


def tree_sample_accept_given_noise(
    tree: DraftTree,
    probs: Tensor,  # [B, N, V] processed target distributions
    accept_u: Tensor,  # [B, D, N] uniforms
    bonus_noise: Tensor,  # [B, V] Exp(1) noise
) -> AcceptResult:
    """Triton `acceptance.tree_sample_accept_given_noise`, bit-compatible up to float rounding."""
    batch, n, vocab = probs.shape
    last = torch.empty(batch, dtype=torch.long, device=probs.device)
    bonus = torch.empty(batch, dtype=torch.long, device=probs.device)
    _sample_walk_kernel[(batch,)](
        tree.tokens.contiguous(), tree.parents.contiguous(), probs.contiguous(), accept_u.contiguous(),
        bonus_noise.contiguous(), last, bonus, n, vocab, tree.max_depth,
        BLOCK_N=triton.next_power_of_2(n), BLOCK_V=_block_v(vocab), ACC=_acc_dtype(probs),
    )
    return assemble_result(tree, last, bonus)


def _block_v(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)


def _acc_dtype(tensor: Tensor):
    """Compare in float64 for float64 inputs (rounding to float32 could create ties), else float32."""
    return tl.float64 if tensor.dtype == torch.float64 else tl.float32
