"""Configuration: small frozen dataclasses, built once at the edge (CLI, app factory) and passed down."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16", "float64")
DRAFT_QUANTIZATIONS = ("none", "int8")


class TreeMode(enum.Enum):
    """How a drafter shapes its proposal."""

    DYNAMIC = "dynamic"  # EAGLE-2: expand the top-k of the best frontier nodes, keep the best `nodes`
    CHAIN = "chain"  # one path of `depth` tokens (needed for lossless sampling with a draft distribution)
    STATIC = "static"  # a fixed shape from `drafting.static_trees.PRESETS`, filled with ranked guesses


@dataclass(frozen=True)
class TreeConfig:
    """Budget of one draft tree. On a CPU verify cost grows with `nodes`, so keep it small there."""

    depth: int = 5
    top_k: int = 4
    nodes: int = 16  # draft nodes verified per step, root excluded
    mode: TreeMode = TreeMode.DYNAMIC
    preset: str = "medium-16"  # the shape used in STATIC mode

    def __post_init__(self) -> None:
        if self.depth < 1 or self.top_k < 1 or self.nodes < 1:
            raise ValueError(f"tree depth, top_k and nodes must be >= 1, got {self}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build an `Engine`.

    `model` and `draft` accept a model-store alias, a local HF folder, a `.gguf` file or a hub id.
    `draft` may also be `"ngram"` (prompt lookup), `"none"` (plain autoregressive decoding) or
    `"auto"` (the store's drafter for a store-alias model, e.g. tiny-vlm's MSD head; else ngram).
    """

    model: str
    draft: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    tree: TreeConfig = field(default_factory=TreeConfig)
    max_model_len: int | None = None  # defaults to the model's own context length
    cache_dir: str | None = None  # model store location; None = the store's default
    calibrate_tree: bool = False  # pick tree.nodes from measured verify cost at load time
    profile: bool = False  # time drafting, verification and whole steps into each request's SpecMetrics
    draft_quantization: str = "none"  # "int8": a draft LM runs as dynamic int8 (CPU; drafting.quantize)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.draft_quantization not in DRAFT_QUANTIZATIONS:
            raise ValueError(f"draft_quantization must be one of {DRAFT_QUANTIZATIONS}, "
                             f"got {self.draft_quantization!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (OpenAI semantics; temperature 0 means greedy)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None = off; k >= 0 = chosen token's logprob plus top-k alternatives
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
