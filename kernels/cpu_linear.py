"""Linear layers with their weights prepacked once at load: the CPU path for few-row products.

A verify forward multiplies a few rows by every weight matrix: the batch's tree tokens, 1 to a few
dozen. Two packed kinds, picked by `packed_linear_class` for the model's dtype and the CPU:

- `PackedLinear` (oneDNN): float32, and bfloat16 on CPUs with native bfloat16 instructions
  (AVX-512 BF16, AMX). For 2-16 rows torch's default CPU path (an MKL sgemm on the row-major weight)
  runs far below the memory bandwidth that bounds it: on this project's 2-core AVX2 machine a
  forward of 2 tokens cost 1.5-1.7x one token although it reads the same weights. oneDNN, on a
  weight reordered into its blocked layout, cuts the cost of 2-16 rows by about 15-35%
  (`benchmarks/results/batch-steps-smollm2-135m-prepack.md`). In bfloat16 on an AVX-512 BF16 CPU the
  packed product gives the same bits as torch's own bfloat16 linear in 0.65-0.8x its time
  (`benchmarks/results/profile-step-smollm2-135m-bf16.md`).
- `HalfLinear` (fbgemm): bfloat16 and float16 models on a CPU without native bfloat16 (AVX2). There
  torch's bfloat16 matmul is fast for one row but several times slower for two or more (a whole
  SmolLM2-135M decoder: 34 ms for 1 row, 116 ms for 4, 185 ms for 8 on this project's 2-core AMD
  EPYC). fbgemm's half-precision GEMM keeps the weights as float16 (a bfloat16 weight is packed only
  if float16 holds it exactly, so the model is unchanged), converts them to float32 in registers and
  multiplies float32 activations: reading half the bytes of float32 at close to the memory
  bandwidth (`benchmarks/results/profile-step-smollm2-135m-bf16-avx2.md`).

Both give a row the same bits whatever rows run beside it, and the target uses them for every
forward it runs (prefill, verification, plain decoding), so a token's linear products are the same
verified in a tree as decoded alone (attention, outside this module, is not yet so in every dtype:
DESIGN.md). oneDNN does so by itself (torch's CPU matmul does not: a single row
takes a different kernel). fbgemm splits the rows into blocks of 1 to 6 and computes blocks of 1 or
2 rows with other kernels than larger ones, so `HalfLinear` pads the rows to a count whose blocks
all give the same bits (`invariant_row_counts`, probed once per process).
"""

from __future__ import annotations

import bisect
import functools
import warnings

import torch
from torch import Tensor, nn

BATCH_HINT = 8  # the row count oneDNN picks the packed layout for (any row count still runs on it)
PROBED_ROWS = 512  # `HalfLinear` row counts up to this are probed; larger products run in chunks

# torch marks its fbgemm half-precision entry points deprecated; they are the only AVX2 kernel in
# torch that reads 16-bit weights at memory speed for several rows (see the module docstring)
warnings.filterwarnings("ignore", message=r"fbgemm_\w+ is deprecated", category=UserWarning)


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN's packed linear exists for float32 on CPU, and for bfloat16 on CPUs that oneDNN runs it on
    natively (AVX-512 BF16, AMX)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def can_pack_half(dtype: torch.dtype, device: torch.device) -> bool:
    """fbgemm's half-precision GEMM exists for 16-bit float models on CPUs with AVX2."""
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and "fbgemm" in torch.backends.quantized.supported_engines and torch.cpu._is_avx2_supported()
            and hasattr(torch, "fbgemm_linear_fp16_weight_fp32_activation"))


def packed_linear_class(dtype: torch.dtype, device: torch.device) -> type[PackedLinear] | type[HalfLinear] | None:
    """The packed linear that serves a `dtype` model on `device`, oneDNN's where it applies; None: torch's own."""
    if can_prepack(dtype, device):
        return PackedLinear
    return HalfLinear if can_pack_half(dtype, device) else None


class PackedLinear(nn.Module):
    """`nn.Linear` with the weight reordered for oneDNN. `keep_weight` keeps the original weight as
    `.weight` too (for an LM head whose weight other code reads, e.g. an EAGLE head's projection)."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach()
        if keep_weight:
            self.weight = linear.weight

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """oneDNN packs any weight of a dtype `can_prepack` allows."""
        return True

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class HalfLinear(nn.Module):
    """`nn.Linear` of a bfloat16 / float16 model with the weight packed for fbgemm's half-precision GEMM:
    float16 weights, float32 products, the output cast back to the model's dtype. Only a weight that
    float16 holds exactly is packed (`fits`). `keep_weight` as for `PackedLinear`."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False) -> None:
        super().__init__()
        if not self.fits(linear):
            raise ValueError("float16 does not hold this layer's weights exactly")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.fbgemm_pack_gemm_matrix_fp16(weight.float()), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        if keep_weight:
            self.weight = linear.weight

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        weight = linear.weight.detach()
        return bool(torch.equal(weight.half().to(weight.dtype), weight))  # out of range: inf != weight

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        step = len(padded_row_counts()) - 1  # the largest invariant row count
        if rows.shape[0] <= step:
            out = self._product(rows)
        else:  # a long product (a long prefill chunk) runs in pieces of the largest invariant count
            out = torch.cat([self._product(rows[start : start + step]) for start in range(0, rows.shape[0], step)])
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _product(self, rows: Tensor) -> Tensor:
        count = rows.shape[0]
        padded = padded_row_counts()[count]
        if padded == count:
            return torch.fbgemm_linear_fp16_weight_fp32_activation(rows.float(), self.packed, self.bias)
        padded_rows = rows.new_zeros(padded, self.in_features, dtype=torch.float32)
        padded_rows[:count] = rows
        return torch.fbgemm_linear_fp16_weight_fp32_activation(padded_rows, self.packed, self.bias)[:count]


@functools.cache
def invariant_row_counts() -> tuple[int, ...]:
    """Row counts up to `PROBED_ROWS` whose every row gets the bits it gets in any other such count.

    Probed by product: every prefix of a random `2 * PROBED_ROWS`-row input against the whole (whose
    last rows may fall in odd blocks; they lie past every prefix probed). A row's bits depend on the
    kernel that computes its block, not on where in the input it sits."""
    generator = torch.Generator().manual_seed(0)
    packed = torch.fbgemm_pack_gemm_matrix_fp16(torch.randn(32, 64, generator=generator))
    rows = torch.randn(2 * PROBED_ROWS, 64, generator=generator)
    whole = torch.fbgemm_linear_fp16_weight_fp32_activation(rows, packed, None)
    return tuple(count for count in range(1, PROBED_ROWS + 1)
                 if torch.equal(torch.fbgemm_linear_fp16_weight_fp32_activation(rows[:count], packed, None),
                                whole[:count]))


@functools.cache
def padded_row_counts() -> list[int]:
    """Entry n: the smallest invariant row count >= n, for n up to the largest one."""
    counts = invariant_row_counts()
    return [counts[bisect.bisect_left(counts, count)] for count in range(counts[-1] + 1)]


def prepack_linears(module: nn.Module, kind: type[PackedLinear] | type[HalfLinear] = PackedLinear) -> int:
    """Replace every `nn.Linear` inside `module` by a `kind` packed linear (the originals' weights are
    dropped; a layer `kind` cannot hold, `kind.fits`, stays as it is); returns how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            if not kind.fits(child):
                continue
            setattr(module, name, kind(child))
            replaced += 1
        else:
            replaced += prepack_linears(child, kind)
    return replaced
