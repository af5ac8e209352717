"""The `coatnet` command line: a thin face over the pipeline's functions.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``; the module sets ``func`` on its parser. Building the parser
imports every sub-command module, so each imports at module top only what is light
(argparse, the launch options, ``pipeline.errors``, ``pipeline.cluster``); what a command
runs (the model, data, trainer, evaluation: torch, streaming, DeepSpeed, Ray) it imports
inside its function, with a comment, so that ``coatnet --help`` and ``coatnet cluster``
start in a fraction of a second.

Errors: a ``pipeline.errors.UserError`` (a missing or empty source, an unreadable bucket, an invalid
config, too many bad inputs, ...) from any sub-command becomes one line on stderr,
``coatnet <cmd>: <message>``, and exit status 2; an interrupt exits 130. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipeline.errors import UserError

# Order is the order of `coatnet --help`.
COMMANDS: tuple[str, ...] = (
    "models",
    "cluster",
    "shard",
    "shards",
    "pretrain",
    "checkpoints",
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


def command_name(args: argparse.Namespace) -> str:
    """``coatnet shard``, ``coatnet shards verify``, ...: the words the user typed to reach the command."""
    words = [args.command]
    action = getattr(args, f"{args.command}_command", None)
    if action:
        words.append(action)
    return "coatnet " + " ".join(words)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{command_name(args)}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command_name(args)}: interrupted (an interrupted `coatnet shard` or training resumes when run "
              "again)", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
