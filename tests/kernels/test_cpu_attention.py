"""The CPU attention kernel: against a float64 reference (padded and packed batches, strided cache rows,
masks), a row's bits independent of what shares the call, the calls it leaves to SDPA, and a machine
without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from specserve.kernels import cpu_attention
from specserve.kernels.grouped_attention import grouped_kernel, grouped_sdpa

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU attention kernel did not build here")

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


class Attention(nn.Module):
    def __init__(self, group: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = group, True


def cache_rows(batch: int, kv_heads: int, width: int, dim: int, dtype: torch.dtype, generator) -> torch.Tensor:
    """Keys or values as the slot cache hands them over: rows of a larger buffer (a strided view)."""
    buffer = torch.randn(batch + 2, kv_heads, width + 9, dim, generator=generator).to(dtype)
    return buffer[1 : batch + 1, :, :width]


def tree_mask(prefixes: list[int], nodes: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, nodes, width]: row b's node j sees its prefix and nodes 0..j (a chain), nothing else."""
    keys = torch.arange(width)
    allowed = torch.stack([(keys < p)[None] | ((keys >= p) & (keys <= p + torch.arange(nodes)[:, None]))
                           for p in prefixes])
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def reference(q, k, v, mask, scale):
    """float64 attention of query [B, H, N, D] over [B, KVH, W, D] with each head's key/value head."""
    group = q.shape[1] // k.shape[1]
    k64, v64 = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = q.double() @ k64.transpose(-1, -2) * scale + mask.double()
    return (scores.softmax(-1) @ v64).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 32, 128])
@pytest.mark.parametrize("nodes", [1, 4])
def test_kernel_matches_a_float64_reference(dtype, dim, nodes):
    generator = torch.Generator().manual_seed(dim + nodes)
    prefixes, heads, kv_heads = [5, 40, 17], 6, 2
    width = max(prefixes) + nodes
    q = torch.randn(len(prefixes), heads, nodes, dim, generator=generator).to(dtype)
    k, v = (cache_rows(len(prefixes), kv_heads, width, dim, dtype, generator) for _ in range(2))
    mask = tree_mask(prefixes, nodes, width, dtype)
    out = cpu_attention.attend(q, k, v, mask, dim**-0.5)
    assert out.shape == (len(prefixes), nodes, heads, dim) and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, dim**-0.5),
                               rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_each_attend_over_their_own_keys(dtype):
    """A packed query (rows of 3, 1 and 5 real nodes one after another) gives each row what the padded
    call gives its real nodes, reading no key past the row's own length."""
    generator = torch.Generator().manual_seed(1)
    sizes, prefixes, heads, kv_heads, dim = [3, 1, 5], [20, 33, 8], 9, 3, 64
    width = max(p + n for p, n in zip(prefixes, sizes))
    k, v = (cache_rows(3, kv_heads, width, dim, dtype, generator) for _ in range(2))
    q = torch.randn(3, heads, max(sizes), dim, generator=generator).to(dtype)
    mask = tree_mask(prefixes, max(sizes), width, dtype)
    padded = cpu_attention.attend(q, k, v, mask, 0.125)
    packed_q = torch.cat([q[b, :, :n] for b, n in enumerate(sizes)], dim=1)[None]
    packed = cpu_attention.attend(packed_q, k, v, mask, 0.125, packed_rows=list(zip(sizes, prefixes)))
    assert packed.shape == (1, sum(sizes), heads, dim)
    assert torch.equal(packed[0], torch.cat([padded[b, :n] for b, n in enumerate(sizes)]))
    k[:, :, 30] = float("nan")  # within row 1's prefix (33), past rows 0 (23 keys) and 2 (13)
    rows = cpu_attention.attend(packed_q, k, v, mask, 0.125, packed_rows=list(zip(sizes, prefixes)))[0]
    assert rows[3:4].isnan().all() and not rows[:3].isnan().any() and not rows[4:].isnan().any()


def test_a_rows_output_has_the_same_bits_whatever_shares_the_call():
    """Batch invariance: one sequence decoded alone, beside others with longer caches (more keys, masked
    for it), and as node 0 of a tree gets bit-identical attention: what makes a bfloat16 token's
    verification the same as its plain decoding."""
    generator = torch.Generator().manual_seed(2)
    dtype, heads, kv_heads, dim, prefix = torch.bfloat16, 9, 3, 64, 77
    k, v = (cache_rows(4, kv_heads, 300, dim, dtype, generator) for _ in range(2))
    q = torch.randn(4, heads, 4, dim, generator=generator).to(dtype)
    alone = cpu_attention.attend(q[:1, :, :1], k[:1, :, : prefix + 1], v[:1, :, : prefix + 1],
                                 tree_mask([prefix], 1, prefix + 1, dtype), 0.125)
    prefixes = [prefix, 250, 3, 120]
    beside = cpu_attention.attend(q[:, :, :1], k[:, :, :251], v[:, :, :251], tree_mask(prefixes, 1, 251, dtype), 0.125)
    in_tree = cpu_attention.attend(q[:, :, :4], k[:, :, :254], v[:, :, :254], tree_mask(prefixes, 4, 254, dtype), 0.125)
    assert torch.equal(beside[0, 0], alone[0, 0]) and torch.equal(in_tree[0, 0], alone[0, 0])


@pytest.mark.parametrize("packed", [False, True])
def test_grouped_kernel_takes_decoding_and_leaves_the_rest_to_sdpa(packed):
    generator = torch.Generator().manual_seed(3)
    module, scale = Attention(3), 0.125
    k, v = (cache_rows(2, 2, 30, 64, torch.float32, generator) for _ in range(2))
    q = torch.randn(2, 6, 3, 64, generator=generator)
    mask = tree_mask([10, 27], 3, 30, torch.float32)
    rows = [(3, 10), (2, 27)] if packed else None
    if packed:
        q = torch.cat([q[0], q[1, :, :2]], dim=1)[None]
    out, _ = grouped_kernel(module, q, k, v, mask, scaling=scale, packed_rows=rows)
    expected, _ = grouped_sdpa(module, q, k, v, mask, scaling=scale, packed_rows=rows)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    # a prompt chunk (no mask: causal), a float64 model, a long query: SDPA's, bit for bit
    prompt = torch.randn(1, 6, 20, 64, generator=generator, dtype=torch.float64)
    keys = torch.randn(1, 2, 20, 64, generator=generator, dtype=torch.float64)
    assert torch.equal(grouped_kernel(module, prompt, keys, keys, None)[0],
                       grouped_sdpa(module, prompt, keys, keys, None)[0])
    assert not cpu_attention.fits(q.double(), k.double(), mask.double(), 3)
    assert not cpu_attention.fits(q, k, mask.bool(), 3)  # a boolean mask
    assert not cpu_attention.fits(q, k, mask, cpu_attention.MAX_TOKENS + 1)
    with pytest.raises(ValueError, match="softcap"):  # refused as grouped_sdpa refuses it
        grouped_kernel(module, q, k, v, mask, scaling=scale, packed_rows=rows, softcap=30.0)


def test_without_a_compiler_attention_stays_on_sdpa(tmp_path):
    """A machine without a C++ compiler: `available()` is False with one warning that says so, and the
    model loads on SDPA (checked in a fresh process: this one has the kernel loaded)."""
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from specserve.kernels import cpu_attention\n"
            "print('available', cpu_attention.available())\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "SPECSERVE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "available False" in done.stdout
    assert "the CPU attention kernel is not available, attention stays on SDPA" in done.stderr
    assert not list((tmp_path / "kernels").glob("*.so"))
