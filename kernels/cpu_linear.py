"""Linear layers with their weights prepacked for oneDNN: the CPU path for few-row products (float32,
and bfloat16 on CPUs with native bfloat16 instructions).

A verify forward multiplies a few rows by every weight matrix: the batch's tree tokens, 1 to a few
dozen. For 2-16 rows torch's default CPU path (an MKL sgemm on the row-major weight) runs far below
the memory bandwidth that bounds it: on this project's 2-core AVX2 machine a forward of 2 tokens
costs 1.5-1.7x one token although it reads the same weights. oneDNN, on a weight reordered once at
load into its blocked layout, cuts the cost of 2-16 rows by about 15-35%; a single row runs
somewhat slower than on torch's path, and 32 rows or more about the same (`benchmarks/profile_step.py` and
the verify-cost curves in `benchmarks/results/batch-steps-smollm2-135m-prepack.md`). Speculative
decoding verifies several tokens per forward, so the engine packs by default on CPU float32. In
bfloat16, on a CPU with AVX-512 BF16 (the 2-core AMD EPYC that runs this project's benchmarks now),
the packed product gives the same bits as torch's own bfloat16 linear and takes 0.65-0.8x its time
for 1-32 rows over SmolLM2-135M's decoder weights (a throwaway timing script; the step-level
effect is in `benchmarks/results/profile-step-smollm2-135m-bf16.md`), so it is packed there too.

oneDNN's product of a row does not depend on how many rows run with it (torch's CPU matmul does: a
single row takes a different kernel), and the target uses it for every forward it runs (prefill,
verification, plain decoding), so speculative output stays exactly the output of the model as served.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BATCH_HINT = 8  # the row count oneDNN picks the packed layout for (any row count still runs on it)


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN's packed linear exists for float32 on CPU, and for bfloat16 on CPUs that oneDNN runs it on
    natively (AVX-512 BF16, AMX); elsewhere bfloat16 keeps torch's own path."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


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

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def prepack_linears(module: nn.Module) -> int:
    """Replace every `nn.Linear` inside `module` by a `PackedLinear` (the originals' weights are
    dropped); returns how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
            replaced += 1
        else:
            replaced += prepack_linears(child)
    return replaced
