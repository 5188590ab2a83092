"""Command-line options of an engine, shared by `specserve generate` and `specserve serve`."""

from __future__ import annotations

import argparse
from pathlib import Path

import jinja2

from ...drafting.budget import TreeBudget, TreeMode
from ...drafting.static_trees import PRESETS
from .config import ATTENTIONS, DRAFT_QUANTIZATIONS, DTYPES, QUANTIZATIONS, EngineConfig

DEFAULT_MODEL = "tiny-vlm"


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and `serve`."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="store alias, HF folder, .gguf file or hub id (default: %(default)s)")
    parser.add_argument("--draft", default="auto",
                        help="'auto' (the store's drafter for --model, e.g. tiny-vlm-msd; else ngram), "
                             "'none', 'ngram', 'suffix' (prompt lookup plus the outputs of earlier "
                             "requests), 'self:N' (the model's own first N layers; 'self:auto': the N that "
                             "decodes fastest, measured at load), an EAGLE/MSD head folder, or a draft model "
                             "(alias, folder, .gguf, hub id) (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--tree-depth", type=int, default=TreeBudget.depth)
    parser.add_argument("--tree-branching", "--tree-top-k", dest="tree_branching", type=int,
                        default=TreeBudget.branching,
                        help="children per expanded draft node (EAGLE-2's top-k; --tree-top-k is the old name)")
    parser.add_argument("--tree-nodes", type=_nodes, default=TreeBudget.draft_nodes,
                        help="draft nodes verified per step (root excluded), or 'auto': the largest "
                             "size whose verify cost stays within 1.3x of one token, measured at load")
    parser.add_argument("--tree-mode", default=TreeBudget.mode.value, choices=[m.value for m in TreeMode])
    parser.add_argument("--tree-preset", default=TreeBudget.preset, choices=sorted(PRESETS),
                        help="tree shape for --tree-mode static")
    parser.add_argument("--draft-quantization", default="none", choices=DRAFT_QUANTIZATIONS,
                        help="'int8': run a draft LM as dynamic int8 weights and activations (CPU only; "
                             "cheaper drafts, the same output) (default: %(default)s)")
    parser.add_argument("--draft-share-prompts", action="store_true",
                        help="with --draft suffix: share prompt tokens with other requests' drafts too "
                             "(default: only the tokens the model generated are shared)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + answer in tokens (default: the model's context); each KV slot "
                             "holds this many")
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                        help="sequences decoded together: KV slots, and rows of one verify forward "
                             "(default: %(default)s)")
    parser.add_argument("--batch-tree-tokens", type=int, default=None,
                        help="a fixed number of tree tokens one verify forward carries over the whole batch, "
                             "each row getting an equal share (0: no cap). Default: each step keeps the draft "
                             "nodes that maximise expected tokens per second on the verify cost measured at "
                             "start")
    parser.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk_tokens,
                        help="prompt tokens prefilled per engine turn over all new requests, so a long "
                             "prompt never stalls the running ones for more than one chunk; 0: whole "
                             "prompts at once (default: %(default)s)")
    parser.add_argument("--kv-cache-memory", type=float, default=EngineConfig.kv_cache_memory_gib,
                        help="GiB for the KV cache, allocated at start; fewer slots than --max-num-seqs if "
                             "it is short (default: %(default)s)")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction,
                        default=EngineConfig.prefix_caching,
                        help="a new text prompt reuses the KV rows of the longest prefix it shares with a "
                             "finished or running sequence and prefills only the rest (default: on)")
    parser.add_argument("--prepack-weights", action=argparse.BooleanOptionalAction,
                        default=EngineConfig.prepack_weights,
                        help="CPU: pack the target's linear weights once at load (oneDNN for float32 and "
                             "native bfloat16, fbgemm's half-precision GEMM for bfloat16/float16 elsewhere), "
                             "faster for the few-row products of verification and batched decoding "
                             "(default: on)")
    parser.add_argument("--attention", default=EngineConfig.attention, choices=ATTENTIONS,
                        help="a grouped-query target's attention: 'kernel' runs decoding and verification on "
                             "specserve's CPU attention kernel (built once with the C++ compiler; SDPA where "
                             "that fails or off the CPU), 'grouped' on torch's SDPA with each key/value head "
                             "read once per group, 'sdpa' is transformers' own (default: %(default)s)")
    parser.add_argument("--quantization", default=EngineConfig.quantization, choices=QUANTIZATIONS,
                        help="store the target's linear weights as weight-only int8 or int4 (CPU; 4x / 8x "
                             "smaller, faster single-token steps, slower wide verify steps); speculative "
                             "output equals the quantized model's own (default: %(default)s)")
    parser.add_argument("--chat-template", type=chat_template, default=None, metavar="FILE_OR_TEMPLATE",
                        help="Jinja chat template (a file, or the template itself) replacing the model's own; "
                             "for a model that has none, or to change how prompts are laid out")
    parser.add_argument("--grammar-draft-tokens", type=int, default=EngineConfig.grammar_draft_tokens,
                        help="structured output (response_format): draft up to this many tokens that the "
                             "grammar forces per step, verified with the drafter's tree; 0: none "
                             "(default: %(default)s)")
    parser.add_argument("--cache-dir", default=None,
                        help="model store directory (default: $SPECSERVE_CACHE or ~/.cache/specserve)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    auto = args.tree_nodes == "auto"
    nodes = TreeBudget.draft_nodes if auto else args.tree_nodes
    tree = TreeBudget(args.tree_depth, args.tree_branching, nodes, TreeMode(args.tree_mode), args.tree_preset)
    return EngineConfig(
        model=args.model, draft=args.draft, dtype=args.dtype, device=args.device, tree=tree,
        max_model_len=args.max_model_len, cache_dir=args.cache_dir, calibrate_tree=auto,
        draft_quantization=args.draft_quantization, draft_share_prompts=args.draft_share_prompts,
        max_num_seqs=args.max_num_seqs, kv_cache_memory_gib=args.kv_cache_memory,
        batch_tree_tokens=args.batch_tree_tokens, prefill_chunk_tokens=args.prefill_chunk or None,
        prefix_caching=args.prefix_caching,
        prepack_weights=args.prepack_weights, attention=args.attention, quantization=args.quantization,
        chat_template=args.chat_template,
        grammar_draft_tokens=args.grammar_draft_tokens,
    )


def chat_template(value: str) -> str:
    """`--chat-template`: the text of the file `value` names, else `value` itself if it is Jinja;
    checked for syntax here, so a broken template stops the command before the model loads."""
    path = Path(value)
    text = path.read_text(encoding="utf-8") if len(value) < 4096 and path.is_file() else value
    if "{{" not in text and "{%" not in text:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a file nor a Jinja template")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise argparse.ArgumentTypeError(
            f"the chat template does not parse: {exc.message} (line {exc.lineno})") from None
    return text


def _nodes(value: str) -> int | str:
    if value == "auto":
        return value
    return int(value)
