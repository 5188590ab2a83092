"""GGUF -> HF folder (safetensors weights, config, generation config, tokenizer.json, chat template).

transformers does the dequantisation (`from_pretrained(..., gguf_file=...)`); this module only makes
the result saveable and checks it. Two pitfalls, both verified with transformers 5.23:

- a GGUF-loaded model carries a GGUF quantizer and `config.quantization_config`, and `save_pretrained`
  refuses to serialise it, although the weights in memory are already plain dequantised tensors;
- the tokenizer rebuilt from GGUF metadata differs between transformers versions. We pin it by
  checking the sha256 of the written `tokenizer.json` against the catalogue (no tokenizer files are
  committed): a different transformers fails the pull loudly instead of silently changing token ids.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

from .errors import ConversionError, IntegrityError

_DTYPES = ("float32", "bfloat16", "float16")

# What transformers raises for GGUF files it cannot read or architectures it cannot map.
_CONVERSION_ERRORS = (ValueError, KeyError, NotImplementedError, OSError)


def convert_gguf(
    gguf_path: Path,
    dest: Path,
    dtype: str = "float32",
    tokenizer_sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert the causal-LM GGUF file `gguf_path` into an HF folder at `dest`; returns `dest`.

    Weights are dequantised and saved as safetensors in `dtype` (bf16 halves the peak RAM of the
    conversion and the disk size). If `tokenizer_sha256` is given, the written tokenizer.json must
    hash to it. Writes into `dest` directly: atomicity is the caller's business (see `layout.build_once`).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    gguf_path, dest = Path(gguf_path), Path(dest)
    # Imported here: `models list` and the resolve fast path should not pay for torch + transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    # dequantize=True: for some architectures transformers can keep GGUF blocks packed in memory
    # (when a matmul kernel is installed); we want plain dense weights to save as safetensors.
    unpacked = GgufConfig(dequantize=True)
    try:
        with _progress_bars(progress):
            tokenizer = AutoTokenizer.from_pretrained(**where)
            model = AutoModelForCausalLM.from_pretrained(
                **where, dtype=getattr(torch, dtype), quantization_config=unpacked
            )
    except _CONVERSION_ERRORS as exc:
        raise ConversionError(
            f"transformers {version('transformers')} cannot convert {gguf_path}: {exc}"
        ) from exc
    _drop_gguf_quantizer(model)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    # The 1.5B model is gigabytes: free it now rather than whenever the caller's frame goes away.
    del model
    gc.collect()
    if tokenizer_sha256 is not None:
        check_tokenizer(dest / "tokenizer.json", tokenizer_sha256)
    return dest


def check_tokenizer(path: Path, expected: str) -> None:
    """Raise `IntegrityError` unless the tokenizer.json at `path` hashes to `expected`."""
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise IntegrityError(
            f"tokenizer {path} rebuilt from GGUF by transformers {version('transformers')} has sha256 "
            f"{actual}, the store pins {expected} (made with transformers 5.23): token ids may differ. "
            "Use the pinned transformers, or check the new tokenizer and update the pin in registry.py."
        )


def _drop_gguf_quantizer(model: object) -> None:
    """Mark the dequantised model as a plain one so `save_pretrained` accepts it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' progress bars for the duration (restoring the previous setting).

    transformers' GGUF dequantisation bar ignores this switch, so it shows even when disabled.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
