"""Loading a target or draft model through the model store (alias, folder, .gguf file or hub id)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...drafting.quantize import quantize_draft_model
from ..store.resolve import hub_error_message, resolve_model
from .adapters import CausalLMAdapter
from .config import EngineConfig
from .target import load_model


class ModelLoadError(RuntimeError):
    """A model named on the command line or in a config could not be loaded."""


def load_draft_model(spec: str, config: EngineConfig) -> torch.nn.Module:
    """The draft LM `spec` in `config`'s dtype and device, or as dynamic int8 if `config` asks (CPU)."""
    int8 = config.draft_quantization == "int8"
    model = load_adapter(spec, config.cache_dir, "float32" if int8 else config.dtype, config.device,
                         attention=config.attention)[1].model
    return quantize_draft_model(model) if int8 else model


def load_adapter(spec: str, cache_dir: str | None, dtype: str, device: str, prepack: bool = False,
                 attention: str = "kernel", quantization: str = "none") -> tuple[str, CausalLMAdapter]:
    """Resolve `spec` through the model store and load it (`prepack`, `attention`, `quantization`: see
    `target.load_model`); a hub id that cannot be loaded (no hub here) becomes a `ModelLoadError` with
    a message that says what `--model` accepts."""
    path = resolve_model(spec, Path(cache_dir) if cache_dir else None)
    try:
        return str(path), load_model(str(path), dtype, device, prepack, attention, quantization)
    except OSError as exc:
        if isinstance(path, Path):
            raise
        raise ModelLoadError(hub_error_message(spec, exc)) from exc


def eos_token_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)
