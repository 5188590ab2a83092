"""llama.cpp as a peer in the serving benchmark: its OpenAI server (`llama-cpp-python[server]`, run from
its own venv) on the GGUF file specserve converts, plain and with its prompt-lookup drafter.

Matched precision: specserve serves a GGUF dequantized to float32 (cast to bfloat16 for `--dtype
bfloat16`), so the same weights in llama.cpp's float paths are a copy of the file with every tensor
dequantized to F32, or rounded on to BF16 (`float_gguf`, metadata kept; 1-D tensors, the norms, stay
F32 in a BF16 copy, as llama.cpp's own converter keeps them). The original file is served too: it is
the model a llama.cpp user runs, with llama.cpp's quantized kernels (same weights, lower-precision
arithmetic).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from specserve.server.store import wheels
from specserve.server.store.registry import CATALOGUE

PROMPT_LOOKUP_TOKENS = 5  # drafted tokens per step, as vLLM's n-gram peer in the same benchmark
READER_FIELDS = "GGUF."  # the reader's pseudo-fields (version, counts), not metadata


def store_gguf(model: str) -> Path:
    """The GGUF file behind a store alias (`smollm2-135m`), or `model` itself when it is a .gguf path."""
    if model.endswith(".gguf"):
        return Path(model)
    entry = CATALOGUE.get(model)
    if entry is None or not getattr(entry.source, "wheels", None):
        raise ValueError(f"{model} has no GGUF file in the store; pass --gguf")
    return wheels.locate(entry.source.wheels[0]).path


FLOAT_TYPES = {  # GGUF copy type by specserve dtype: (tensor type of 2-D+ tensors, file type)
    "float32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "bfloat16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}


def float_gguf(source: Path, dest: Path, dtype: str = "float32") -> Path:
    """Write `source` to `dest` with every tensor dequantized to F32, then for "bfloat16" rounded to BF16
    (1-D tensors stay F32), the metadata unchanged except `general.file_type`; returns `dest`. Written
    once: an existing `dest` is kept."""
    if dest.exists():
        return dest
    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")  # renamed once complete: an interrupted write is redone
    writer = gguf.GGUFWriter(partial, arch)
    tensor_type, file_type = FLOAT_TYPES[dtype]
    for name, field in reader.fields.items():
        if name.startswith(READER_FIELDS) or name == gguf.Keys.General.ARCHITECTURE:
            continue  # the writer adds the architecture and the counts itself
        value = file_type if name == gguf.Keys.General.FILE_TYPE else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type)
    for tensor in reader.tensors:
        # numpy order is the reverse of GGUF's; dequantize returns it, the writer reverses it back
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        weights = weights.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if tensor_type == gguf.GGMLQuantizationType.F32 or weights.ndim == 1:
            writer.add_tensor(tensor.name, weights)
        else:
            packed = gguf.quants.quantize(weights, tensor_type)
            writer.add_tensor(tensor.name, packed, raw_shape=packed.shape, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(dest)
    return dest


def server_command(python: str, gguf_path: Path, host: str, port: int, threads: int, max_model_len: int,
                   prompt_lookup: bool) -> list[str]:
    """`python -m llama_cpp.server` on `gguf_path`, its chat template from the file's metadata. Concurrent
    requests queue (the server runs one at a time); by default a new request would cut the running one off."""
    command = [python, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", host, "--port", str(port),
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(max_model_len),
               "--interrupt_requests", "False"]
    if prompt_lookup:
        command += ["--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens",
                    str(PROMPT_LOOKUP_TOKENS)]
    return command
