"""`python -m specserve.drafting.train train-draft ...`: the same command as `specserve train-draft`."""

from __future__ import annotations

import argparse
import sys

from .cli import add_train_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specserve.drafting.train")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
