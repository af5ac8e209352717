"""The `coatnet` command line: a thin face over the pipeline's functions.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``; the module sets ``func`` on its parser. Modules are
imported lazily so that ``coatnet models`` does not pay for importing Ray or
DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Order is the order of `coatnet --help`.
COMMANDS: tuple[str, ...] = (
    "models",
    "cluster",
    "shard",
    "shards",
    "pretrain",
    "finetune",
    "evaluate",
    "register",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coatnet",
        description="Pretrain, fine-tune, evaluate and register CoAtNet models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pipeline.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
