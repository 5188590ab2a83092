"""Int8 draft LMs for CPU serving.

At batch 1 a draft forward is bound by reading weights from memory, so a draft LM's cost is about its
bytes. Dynamic int8 quantisation stores every `nn.Linear` (the LM head included) as int8 weights with
per-row scales and quantises activations per call, which runs through fbgemm/oneDNN's int8 GEMMs on
x86 CPUs (`benchmarks/offline.py --draft-quantization int8` measures the effect next to bf16). The
drafts change a little; the output does not, because the target verifies every token (greedy and
sampled acceptance are exact for any draft).

This uses `torch.ao.quantization.quantize_dynamic`, which PyTorch deprecates in favour of torchao but
still ships (the project pins torch < 2.14); the CPU kernels it calls are the fastest int8 path here.
It has no CUDA kernels: on a GPU a bf16 draft model is already cheap next to the target.
"""

from __future__ import annotations

import warnings

import torch


def quantize_draft_model(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the Linear layers of a float32 CPU model, in place, by dynamic int8 ones."""
    if model.device.type != "cpu":
        raise ValueError(f"int8 draft quantisation runs on CPU only, the draft model is on {model.device}")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("int8 draft quantisation needs the draft model loaded in float32")
    with warnings.catch_warnings():
        # torch.ao's deprecation notices (see the module docstring), raised for every layer
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", message=r".*(deprecated|torchao).*")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
