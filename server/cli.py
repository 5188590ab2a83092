"""The `specserve` command: `generate`, `serve`, `models`, `train-draft`."""

from __future__ import annotations

import argparse
import sys

from ..drafting.static_trees import PRESETS
from .config import DRAFT_QUANTIZATIONS, DTYPES, EngineConfig, SamplingParams, TreeConfig, TreeMode

DEFAULT_MODEL = "tiny-vlm"


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and `serve`."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="store alias, HF folder, .gguf file or hub id (default: %(default)s)")
    parser.add_argument("--draft", default="auto",
                        help="'auto' (the store's drafter for --model, e.g. tiny-vlm-msd; else ngram), "
                             "'none', 'ngram', an EAGLE/MSD head folder, or a draft model (alias, "
                             "folder, .gguf, hub id) (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--tree-depth", type=int, default=TreeConfig.depth)
    parser.add_argument("--tree-top-k", type=int, default=TreeConfig.top_k)
    parser.add_argument("--tree-nodes", type=_nodes, default=TreeConfig.nodes,
                        help="draft nodes verified per step (root excluded), or 'auto': the largest "
                             "size whose verify cost stays within 1.3x of one token, measured at load")
    parser.add_argument("--tree-mode", default=TreeConfig.mode.value, choices=[m.value for m in TreeMode])
    parser.add_argument("--tree-preset", default=TreeConfig.preset, choices=sorted(PRESETS),
                        help="tree shape for --tree-mode static")
    parser.add_argument("--draft-quantization", default="none", choices=DRAFT_QUANTIZATIONS,
                        help="'int8': run a draft LM as dynamic int8 weights and activations (CPU only; "
                             "cheaper drafts, the same output) (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--cache-dir", default=None,
                        help="model store directory (default: $SPECSERVE_CACHE or ~/.cache/specserve)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    auto = args.tree_nodes == "auto"
    nodes = TreeConfig.nodes if auto else args.tree_nodes
    tree = TreeConfig(args.tree_depth, args.tree_top_k, nodes, TreeMode(args.tree_mode), args.tree_preset)
    return EngineConfig(
        model=args.model, draft=args.draft, dtype=args.dtype, device=args.device, tree=tree,
        max_model_len=args.max_model_len, cache_dir=args.cache_dir, calibrate_tree=auto,
        draft_quantization=args.draft_quantization,
    )


def _nodes(value: str) -> int | str:
    if value == "auto":
        return value
    return int(value)


def run_generate(args: argparse.Namespace) -> int:
    from .engine import Engine

    engine = Engine.from_config(engine_config(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    content = [{"type": "text", "text": args.prompt}]
    if args.image:
        from PIL import Image

        content.insert(0, {"type": "image", "image": Image.open(args.image)})
    prompt = engine.prepare_chat([{"role": "user", "content": content}])
    seq = engine.start(prompt, params)
    try:
        while not seq.finished:
            sys.stdout.write(engine.step(seq).text)
            sys.stdout.flush()
    finally:
        engine.release(seq)
    m = seq.metrics
    sys.stdout.write("\n")
    sys.stderr.write(
        f"[specserve] {len(seq.output_ids)} tokens, {m.verify_steps} verify steps, mean accepted length "
        f"{m.mean_accepted_length:.2f} (incl. bonus), acceptance per position {m.per_position_acceptance}\n"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a reply to one prompt (streams to stdout)")
    add_engine_arguments(gen)
    gen.add_argument("prompt")
    gen.add_argument("--image", help="an image file to put before the prompt (vision-language models)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(run=run_generate)

    from .http.serve import add_serve_arguments, run_serve
    from .store.cli import add_models_parser, run_models

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)
    add_models_parser(sub).set_defaults(run=run_models)

    from ..drafting.train.cli import add_train_parser

    add_train_parser(sub)  # `train-draft`: sets its own `run`
    return parser


def main(argv: list[str] | None = None) -> int:
    from .engine import ModelLoadError
    from .store.errors import StoreError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelLoadError, StoreError) as exc:
        sys.stderr.write(f"specserve: error: {exc}\n")
        return 2
