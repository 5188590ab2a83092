"""A low-rank adapter on SmolLM2's linear layers: trained in `train`, merged into the weights in `assemble`.

Only the factors are committed (a few MB, versus 540 MB for merged weight matrices). They are
exported with the scale folded into B, so merging is `W += B @ A` for every adapted layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraLinear(nn.Module):
    """`base(x) + scale * x A^T B^T`; B starts at zero so training starts from the plain model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def add_lora(root: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap every `nn.Linear` under `root` (in place) and return the new trainable factors."""
    targets = [(name, module) for name, module in root.named_modules() if isinstance(module, nn.Linear)]
    params: list[nn.Parameter] = []
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        wrapped = LoraLinear(linear, rank, alpha)
        setattr(root.get_submodule(parent_name), child, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    return params


def export_factors(root: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """`{prefix + linear path + ".lora_a"/".lora_b": factor}` with the scale folded into B."""
    factors = {}
    for name, module in root.named_modules():
        if isinstance(module, LoraLinear):
            factors[f"{prefix}{name}.lora_a"] = module.lora_a.detach().clone()
            factors[f"{prefix}{name}.lora_b"] = (module.lora_b * module.scale).detach().clone()
    return factors


@torch.no_grad()
def load_factors(root: nn.Module, factors: dict[str, torch.Tensor], prefix: str) -> None:
    """Put exported factors back into the `LoraLinear`s under `root` (the inverse of `export_factors`)."""
    for name, module in root.named_modules():
        if isinstance(module, LoraLinear):
            module.lora_a.copy_(factors[f"{prefix}{name}.lora_a"])
            module.lora_b.copy_(factors[f"{prefix}{name}.lora_b"].float() / module.scale)


@torch.no_grad()
def merge_factors(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Add `B @ A` (computed in float32) to the weight of each linear layer named in `factors`."""
    for key in sorted(k for k in factors if k.endswith(".lora_a")):
        path = key.removesuffix(".lora_a")
        linear = model.get_submodule(path)
        delta = factors[path + ".lora_b"].float() @ factors[key].float()
        if delta.shape != linear.weight.shape:
            raise ValueError(f"LoRA factors of {path} give {tuple(delta.shape)}, not {tuple(linear.weight.shape)}")
        linear.weight += delta.to(linear.weight.dtype)
