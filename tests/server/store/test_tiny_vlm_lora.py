"""tiny-vlm's LoRA: exported factors merge into the same function, and load back for resuming."""

from __future__ import annotations

import torch
from torch import nn

from specserve.server.store.tiny_vlm.lora import add_lora, export_factors, load_factors, merge_factors


def _layers(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def test_exported_factors_merge_into_the_adapted_function_and_load_back():
    adapted = _layers(0)
    add_lora(adapted, rank=2, alpha=4.0)
    for module in adapted.modules():
        if hasattr(module, "lora_b"):
            nn.init.normal_(module.lora_b)  # B starts at zero; make the adapter do something
    factors = export_factors(adapted, "net.")
    x = torch.randn(3, 6)

    merged = _layers(0)
    merge_factors(nn.ModuleDict({"net": merged}), factors)
    torch.testing.assert_close(merged(x), adapted(x))

    resumed = _layers(0)
    add_lora(resumed, rank=2, alpha=4.0)
    load_factors(resumed, factors, "net.")
    torch.testing.assert_close(resumed(x), adapted(x))
    assert not torch.allclose(_layers(0)(x), adapted(x))
