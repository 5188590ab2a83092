"""A CPU kernel for attention of a few query tokens per sequence: batched decoding and tree verification.

Why a kernel of our own: at SmolLM2's decode shape (8 sequences x 9 query heads on 3 key/value heads,
a few hundred cached tokens) torch's CPU SDPA kernel spends 170-280 µs per layer on about 3 MFLOP,
a fifth to a quarter of an 8-row step (`DESIGN.md`, the notes on the target's forward on CPU).
Its blocked GEMMs are made for long queries; a decode query is a few rows. No maintained library
fits: FlexAttention compiled for the CPU took 746 µs at that shape (against 240 for SDPA) after a
21 s compile, explicit matmul / softmax / matmul was slower than SDPA, and the vendors' CPU kernels
(vLLM's, IPEX's) come only inside their own engines, built against other torch versions.

`cpu_attention.cpp` streams each sequence's keys and values once per key/value head, for every query
row of the head's group, in float32 on torch's own vector types (`ATen/cpu/vec`, the ones Inductor's
generated C++ uses), one task per (sequence, head) on torch's intra-op threads. It takes the rows of a
packed batch (`DraftTree.packing`) in one call and attends each sequence only up to its own length.

It also fixes the reduction order of each query row (the .cpp's header): a row's output has the same
bits whatever else shares the call, so a token verified in a tree or beside other sequences gets
the attention it gets decoded alone.

The .cpp is compiled once per machine and torch version with the C++ compiler on PATH (`$CXX`, else
`c++`) into the specserve cache (`$SPECSERVE_CACHE`, else `$XDG_CACHE_HOME/specserve`, else
`~/.cache/specserve`, under `kernels/`) and loaded with `torch.ops.load_library`, about 10 s on a 2-core
machine. Not `torch.utils.cpp_extension.load`: it needs the `ninja` executable on PATH, which a venv's
Python run without activating the venv does not have. Without a compiler, or where the build fails,
`available()` is False (one warning with the compiler's message) and attention stays on SDPA.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
from functools import cache, lru_cache
from pathlib import Path

import torch
from torch import Tensor

from .cache import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TOKENS = 16  # query tokens per sequence: beyond this SDPA's blocked GEMMs win
MAX_HEAD_DIM = 256
# torch's vector ISA -> the macro that selects it in ATen/cpu/vec and the flags it needs (as Inductor
# builds its generated C++); any other capability builds the portable vector types
ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


def compile_command(output: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    return [os.environ.get("CXX", "c++"), "-O3", "-std=c++20", "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), []),
            *(f"-I{path}" for path in include_paths()), str(SOURCE), "-o", str(output),
            *(f"-L{path}" for path in library_paths()), "-lc10", "-ltorch_cpu"]


@cache
def available() -> bool:
    """Build (once per machine: the library is cached under its source, torch version and flags) and
    load the kernel; False, with one warning, where that fails."""
    if hasattr(torch.ops.specserve_cpu, "attend"):
        return True
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()
                         + " ".join(compile_command(Path("out"))).encode()).hexdigest()[:16]
    library = default_cache_dir() / "kernels" / f"cpu_attention-{key}.so"
    try:
        if not library.exists():
            log.info("building the CPU attention kernel (once per machine, about 10 s): %s", library)
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as work:  # build aside, then move in whole
                built = Path(work) / library.name
                subprocess.run(compile_command(built), check=True, capture_output=True, text=True)
                os.replace(built, library)
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        log.warning("the CPU attention kernel is not available, attention stays on SDPA: %s",
                    detail.strip()[-2000:])
        return False
    return True


def takes(dtype: torch.dtype, head_dim: int, tokens: int) -> bool:
    """Whether the kernel takes a model of this dtype and head dimension (whole vectors of 16 floats, up
    to MAX_HEAD_DIM), `tokens` query tokens per sequence (at most MAX_TOKENS), and it is built."""
    return (dtype in DTYPES and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM and tokens <= MAX_TOKENS
            and available())


def fits(query: Tensor, key: Tensor, mask: Tensor | None, tokens: int) -> bool:
    """Whether `attend` takes this call: CPU tensors the kernel `takes`, an additive mask of the query's
    dtype shared by all heads."""
    return (query.device.type == "cpu" and key.dtype == query.dtype and mask is not None
            and mask.dtype == query.dtype and mask.shape[1] == 1 and takes(query.dtype, query.shape[-1], tokens))


def attend(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float,
           packed_rows: tuple[tuple[int, int], ...] | None = None) -> Tensor:
    """transformers' attention layout in and out, as `grouped_attention.grouped_sdpa` takes it.

    query [B, H, N, D] (every sequence N tokens), or [1, H, T, D] with `packed_rows` (each sequence's
    real tokens and cached tokens, its tokens in order along T); key / value [B, KVH, W, D]; mask
    [B or 1, 1, N, W] additive. Returns [B, N, H, D] ([1, T, H, D] packed)."""
    batch, heads, tokens, dim = query.shape
    rows = key.shape[0]
    flat = query.transpose(1, 2).reshape(batch * tokens, heads, dim).contiguous()
    starts, lengths = row_bounds(rows, tokens, key.shape[2], None if packed_rows is None else tuple(packed_rows))
    masks = mask[:, 0].expand(rows, *mask.shape[2:])
    if masks.stride(-1) != 1:
        masks = masks.contiguous()
    out = torch.ops.specserve_cpu.attend(flat, key, value, masks, starts, lengths, scale)
    return out.view(batch, tokens, heads, dim)


@lru_cache(maxsize=8)
def row_bounds(rows: int, tokens: int, width: int,
               packed_rows: tuple[tuple[int, int], ...] | None) -> tuple[Tensor, Tensor]:
    """(each sequence's first query row [rows + 1], its key length [rows]) for the kernel: the same for
    every layer of a forward, so built once (callers only read them)."""
    if packed_rows is None:
        return torch.arange(0, rows * tokens + 1, tokens), torch.full((rows,), width, dtype=torch.long)
    counts = torch.tensor([[nodes, cached + nodes] for nodes, cached in packed_rows], dtype=torch.long)
    return torch.cat([counts.new_zeros(1), counts[:, 0].cumsum(0)]), counts[:, 1].contiguous()
