"""Training of EAGLE/MSD draft heads (`specserve train-draft`); the lead wires the CLI entry points."""

from .cli import add_train_parser, run_train

__all__ = ["add_train_parser", "run_train"]
