"""Entry point of a Ray job submitted by the flows: run one `coatnet` CLI command on the cluster, then copy
what it left in its run directory on the cluster node (``result.json``, the exported weights, configs,
curves; not the checkpoints, which the trainer already copies to ``checkpoint.upload_uri``) to the object
store, where the flow picks it up for evaluation and registration.

    python -m flows.ray_entry --outputs-uri s3://bucket/runs/NAME/pretrain/outputs -- pretrain --config ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import storage
from pipeline.artifacts import RunDir
from pipeline.cli import main as coatnet
from pipeline.train.config import apply_overrides, read_recipe

# Not copied: the trainer uploads the checkpoints itself; logs, the streaming cache and Ray's files stay.
SKIP_DIRS = (RunDir.CHECKPOINTS, RunDir.LOGS, RunDir.CACHE, "ray")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.ray_entry")
    parser.add_argument("--outputs-uri", required=True)
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the `coatnet` arguments")
    args = parser.parse_args(argv)
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli

    rc = coatnet(cli)
    if rc:
        return rc
    output_dir = output_dir_of(cli)
    files = [p for p in Path(output_dir).rglob("*")
             if p.is_file() and p.relative_to(output_dir).parts[0] not in SKIP_DIRS]
    for p in files:
        storage.upload_file(p, storage.join(args.outputs_uri, p.relative_to(output_dir).as_posix()))
    print(f"copied {len(files)} files of {output_dir} to {args.outputs_uri}", flush=True)
    return 0


def output_dir_of(cli: Sequence[str]) -> str:
    """The run directory the command wrote: its recipe's ``output_dir`` after the command's overrides."""
    config = cli[list(cli).index("--config") + 1]
    overrides = [a for a in cli[1:] if "=" in a and not a.startswith("-")]
    data = apply_overrides(read_recipe(config), overrides)  # with the rows' `extends:` resolved
    return str(data["output_dir"])


if __name__ == "__main__":
    sys.exit(main())
