"""Weight-only int8 / int4 linear layers: a target served quantized on CPU.

The weights are stored as integers (int8: a quarter of float32's bytes; int4: an eighth) and the
products run on torch's own CPU kernels, which take bfloat16 activations:
- int8: `_weight_int8pack_mm`, one symmetric scale per output channel.
- int4: `_weight_int4pack_mm_for_cpu`, groups of 32 input features, each with a scale and an offset
  (asymmetric: value = scale * code + minimum, codes 0..15). This is the layout of a GGUF Q4_1 block,
  so a Q4_1 file (which the model store dequantizes) quantized again here gets its own 4-bit codes
  back; its scales and minimums are rounded to bfloat16.

Why these kernels and not torchao: on this project's AVX2 CPU torchao 0.18's weight-only int8 ran
slower than `_weight_int8pack_mm` (it does not reach that kernel) and its int4 has no CPU layout any
more. With float32 activations both torch kernels take a far slower path, hence bfloat16 activations.
`benchmarks/profile_step.py --quantization none int8 int4` measures whole verify steps: against
float32 they are faster for one to a few rows and slower for many, so they trade verification's
cheap extra tokens for smaller weights and faster single-token steps.

Lossless serving needs a row's product not to depend on the rows beside it (a token verified in a
tree gets the bits it gets when decoded alone): both kernels keep that (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

QUANTIZATION_BITS = {"int8": 8, "int4": 4}
GROUP = 32  # int4: input features sharing one scale and minimum (a Q4_1 block)
ACTIVATIONS = torch.bfloat16  # the dtype both kernels multiply in


def can_quantize(linear: nn.Linear, bits: int) -> bool:
    """The kernels' shape rules: int4 needs output features divisible by 16 and input features by 32."""
    if linear.weight.device.type != "cpu":
        return False
    return bits == 8 or (linear.out_features % 16 == 0 and linear.in_features % GROUP == 0)


class WeightOnlyLinear(nn.Module):
    """`nn.Linear` with int8 or int4 weights (`bits`). `keep_weight` keeps the float weight as `.weight`
    too: meant for an LM head tied to the input embeddings, where it costs nothing. Code that needs a
    float weight of an untied one asks `dequantized_weight` for it, when it needs it."""

    def __init__(self, linear: nn.Linear, bits: int, keep_weight: bool = False) -> None:
        super().__init__()
        if not can_quantize(linear, bits):
            raise ValueError(f"no int{bits} CPU kernel for a {linear.out_features}x{linear.in_features} "
                             f"linear on {linear.weight.device}")
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        weight = linear.weight.detach().float()
        if bits == 8:
            codes, scales = quantize_int8(weight)
            self.register_buffer("codes", codes)
            self.register_buffer("scales", scales.to(ACTIVATIONS))
        else:
            codes, scales, minimums = quantize_int4(weight)
            self.register_buffer("codes", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
            # the kernel computes (code - 8) * scale + zero: zero = minimum + 8 * scale; [groups, out, 2]
            zeros = minimums + 8 * scales
            self.register_buffer("scales", torch.stack([scales.t(), zeros.t()], dim=-1).contiguous().to(ACTIVATIONS))
        self.bias = None if linear.bias is None else linear.bias.detach()
        if keep_weight:
            self.weight = linear.weight

    def dequantized_weight(self, rows: Tensor | None = None) -> Tensor:
        """The float32 weight the kernels multiply by ([out, in]; only `rows` of it if given)."""
        if self.bits == 8:
            codes, scales = (self.codes, self.scales) if rows is None else (self.codes[rows], self.scales[rows])
            return codes.float() * scales.float()[:, None]
        # int4's packing is the kernel's own: multiplying the identity reads the weight back (exactly:
        # a code times a bfloat16 scale plus a bfloat16 zero, one product per output, in bfloat16)
        weight = self(torch.eye(self.in_features)).t().float()
        return weight if rows is None else weight[rows]

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).to(ACTIVATIONS)
        if self.bits == 8:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.codes, GROUP, self.scales)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (codes [out, in] int8, scales [out])."""
    scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int4 in groups of `GROUP` input features, as GGUF's Q4_1: (codes [out, in] int32 in
    0..15, scales [out, groups], minimums [out, groups])."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // GROUP, GROUP)
    minimums, maximums = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((maximums - minimums) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - minimums[..., None]) / scales[..., None]).clamp(0, 15)
    return codes.to(torch.int32).reshape(out_features, in_features), scales, minimums


def quantize_linears(module: nn.Module, bits: int) -> int:
    """Replace every `nn.Linear` inside `module` that the kernels can take by a `WeightOnlyLinear`;
    returns how many were replaced (the others stay as they are)."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            if can_quantize(child, bits):
                setattr(module, name, WeightOnlyLinear(child, bits))
                replaced += 1
        else:
            replaced += quantize_linears(child, bits)
    return replaced
