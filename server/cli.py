"""The `specserve` command: `generate`, `serve`, `ray-serve`, `bench`, `models`, `train-draft`."""

from __future__ import annotations

import argparse
import sys

from .engine.args import add_engine_arguments, engine_config
from .engine.config import SamplingParams


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

    from .bench.cli import add_bench_parser

    add_bench_parser(sub)  # `bench`: sets its own `run`

    from .ray.cli import add_ray_serve_parser

    add_ray_serve_parser(sub)  # `ray-serve`: sets its own `run`; imports Ray only when run

    from .training.draft_head.cli import add_train_parser

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
