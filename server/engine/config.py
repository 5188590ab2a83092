"""Configuration: small frozen dataclasses, built once at the edge (CLI, app factory) and passed down."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ...drafting.budget import TreeBudget
from ...kernels.sampling import LogitsParams
from ...kernels.weight_only import QUANTIZATION_BITS

DTYPES = ("float32", "bfloat16", "float16", "float64")
DRAFT_QUANTIZATIONS = ("none", "int8")
QUANTIZATIONS = ("none", *QUANTIZATION_BITS)
ATTENTIONS = ("kernel", "grouped", "sdpa")
GiB = 1024**3


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build an `Engine`.

    `model` and `draft` accept a model-store alias, a local HF folder, a `.gguf` file or a hub id.
    `draft` may also be `"ngram"` (prompt lookup), `"suffix"` (prompt lookup plus past outputs of this
    engine), `"self:N"` (the target's first N layers; `"self:auto"`: N measured at load), `"none"`
    (plain autoregressive decoding) or `"auto"` (the store's drafter for a store-alias model, e.g.
    tiny-vlm's MSD head; else ngram).
    """

    model: str
    draft: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    tree: TreeBudget = field(default_factory=TreeBudget)
    max_model_len: int | None = None  # defaults to the model's own context length
    cache_dir: str | None = None  # model store location; None = the store's default
    calibrate_tree: bool = False  # pick tree.draft_nodes from measured verify cost at load time
    profile: bool = False  # time drafting, verification and whole steps into each request's SpecMetrics
    draft_quantization: str = "none"  # "int8": a draft LM runs as dynamic int8 (CPU; drafting.quantize)
    max_num_seqs: int = 8  # sequences the KV cache holds (and a verify batch carries) at once
    kv_cache_memory_gib: float = 2.0  # budget of the KV cache; fewer slots than max_num_seqs if it is short
    # tree tokens (root included) of one verify forward over the whole batch, shared equally by its
    # rows; None = planned each step from the measured verify cost (`planner.GoodputPlanner`),
    # 0 = no cap (every row its full tree)
    batch_tree_tokens: int | None = None
    # prompt tokens prefilled per engine turn over all new sequences (chunked prefill): a long prompt
    # delays the running sequences' next tokens by one chunk's forward at a time; None = whole prompts
    prefill_chunk_tokens: int | None = 256
    # a new text prompt gets the KV rows of the longest prefix it shares with any slot, free or running,
    # copied into its own slot, and prefills only the rest (a repeated system prompt, the next turn)
    prefix_caching: bool = True
    draft_share_prompts: bool = False  # suffix drafter: share prompt tokens too, not only generated ones
    # CPU: the target's linear weights packed once at load (kernels.cpu_linear: oneDNN for float32 and
    # native bfloat16, fbgemm's half-precision GEMM for bfloat16 / float16 elsewhere), faster for the
    # few-row products of verification and batched decoding; ignored on other devices
    prepack_weights: bool = True
    # a grouped-query target's attention (`target.load_model`): "kernel", the engine's grouped-query
    # attention with decoding and verification on its own CPU kernel (kernels.cpu_attention; SDPA where
    # the kernel cannot be built or off the CPU); "grouped", the same on torch's SDPA; "sdpa", transformers'
    attention: str = "kernel"
    # "int8" / "int4": the target's linear weights stored weight-only quantized (CPU; kernels.weight_only);
    # lossless with respect to the quantized model
    quantization: str = "none"
    # Jinja chat template replacing the model's own (for a model without one, or a fixed one); None = the model's
    chat_template: str | None = None
    # structured output: at most this many tokens the grammar forces are drafted per tree (0 = none)
    grammar_draft_tokens: int = 16

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.batch_tree_tokens is not None and self.batch_tree_tokens < 0:
            raise ValueError("batch_tree_tokens must be >= 0 or None")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be >= 1 or None")
        if self.grammar_draft_tokens < 0:
            raise ValueError("grammar_draft_tokens must be >= 0")
        if self.max_num_seqs < 1 or self.kv_cache_memory_gib <= 0:
            raise ValueError("max_num_seqs must be >= 1 and kv_cache_memory_gib > 0")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.draft_quantization not in DRAFT_QUANTIZATIONS:
            raise ValueError(f"draft_quantization must be one of {DRAFT_QUANTIZATIONS}, "
                             f"got {self.draft_quantization!r}")


@dataclass(frozen=True)
class ResponseFormat:
    """A grammar the answer must follow: OpenAI's `response_format` beyond plain text (any JSON object,
    or JSON that matches a schema), or a Lark grammar (llguidance's dialect, e.g. the tool calls that
    `tool_choice` "required" asks for)."""

    kind: str  # "json_object" | "json_schema" | "lark"
    # json_schema: the schema as compact JSON text, in the client's key order (the order of
    # `properties` is the order of the answer's fields, so keys are not sorted); lark: the grammar
    schema: str | None = None

    @classmethod
    def json_schema(cls, schema: dict) -> ResponseFormat:
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (OpenAI semantics; temperature 0 means greedy)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # top-k filtering of the distribution, 0 = off (tree branching is TreeBudget.branching)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None = off; k >= 0 = chosen token's logprob plus top-k alternatives
    ignore_eos: bool = False
    # False: verify the root alone every step (plain decoding, no draft tree) in the same batch, e.g.
    # to compare against drafting; the output is the same either way (lossless)
    speculative: bool = True
    # (token id, bias) pairs added to the target's logits before sampling (OpenAI's logit_bias, -100..100)
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # no end token (EOS) and no stop string before this many tokens (vLLM's)
    # None = free text; else every token is drawn from what the format's grammar allows
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.response_format is not None and (self.ignore_eos or self.min_tokens):
            # the grammar decides where the output ends: it allows only an end token once it is complete
            raise ValueError("response_format cannot be combined with ignore_eos or min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logits_params(self) -> LogitsParams:
        """The part a drafter and the sampler need: what turns logits into a distribution."""
        return LogitsParams(self.temperature, self.top_p, self.top_k)
