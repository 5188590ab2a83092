"""`specserve train-draft`: train an EAGLE/MSD draft head for a target by online self-distillation."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import fields

from ....drafting.eagle_head import ImageMode
from .loop import TrainConfig

# Numeric options take their flag, type and default from `TrainConfig`; the rest are spelled out.
_NUMERIC = [f for f in fields(TrainConfig) if isinstance(f.default, (int, float))]


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train-draft` on a `specserve` subparsers object; returns the new parser."""
    parser = subparsers.add_parser(
        "train-draft", help="train an EAGLE/MSD draft head by online self-distillation",
        description=__doc__,
    )
    parser.add_argument("--model", default="tiny-vlm", help="target: store alias or HF folder")
    parser.add_argument("--out", required=True, help="run folder: data, checkpoint, head/ and eval.json")
    parser.add_argument("--image-mode", default=ImageMode.DECOUPLED.value, choices=[m.value for m in ImageMode])
    parser.add_argument("--dtype", default=TrainConfig.dtype, help="teacher dtype (default: %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="model store directory")
    for field in _NUMERIC:
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=field.default,
                            help="default: %(default)s")
    parser.set_defaults(run=run_train)
    return parser


def train_config(args: argparse.Namespace) -> TrainConfig:
    numeric = {f.name: getattr(args, f.name) for f in _NUMERIC}
    return TrainConfig(
        model=args.model, out=args.out, image_mode=ImageMode(args.image_mode), dtype=args.dtype,
        cache_dir=args.cache_dir, **numeric,
    )


def run_train(args: argparse.Namespace) -> int:
    """Train (resuming from `--out` if it holds a checkpoint); prints the held-out evaluation."""
    if importlib.util.find_spec("easy_vqa") is None:  # the image prompts: easy-vqa's train split
        sys.stderr.write("specserve: error: train-draft needs the 'train' extra: "
                         "pip install 'specserve[train]' (from a checkout: pip install -e '.[train]')\n")
        return 2
    from ...engine import Engine
    from ...engine.config import EngineConfig
    from .loop import train

    config = train_config(args)
    engine = Engine.from_config(EngineConfig(model=config.model, dtype=config.dtype, cache_dir=config.cache_dir))
    summary = train(engine, config)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0
