"""`coatnet checkpoints verify RUN_DIR`: each checkpoint of a local training run against its manifest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("checkpoints", help="check a training run's checkpoints")
    sub = p.add_subparsers(dest="checkpoints_command", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="one line per checkpoint: intact, damaged (why), incomplete or unverified; "
                                      "exit 1 when the newest complete one is not intact")
    v.add_argument("run_dir", help="a training output directory, or its checkpoints/ directory")
    v.add_argument("--hash-all", action="store_true", help="also hash files over 64 MiB (slow at scale)")
    v.set_defaults(func=verify)


def verify(args: argparse.Namespace) -> int:
    # lazy: the checkpoint module imports torch (see pipeline.cli)
    from pipeline.train import checkpoint, manifest

    root = Path(args.run_dir)
    root = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    tags = sorted(p.name for p in root.iterdir() if checkpoint.TAG_RE.match(p.name)) if root.is_dir() else []
    if not tags:
        raise UserError(f"no checkpoints under {root} (expected step_NNNNNNNN directories)")
    newest_complete_ok = None
    for tag in tags:
        step_dir = root / tag
        if not (step_dir / checkpoint.COMPLETE).is_file():
            state = "incomplete (no complete.json: an interrupted save)"
        elif not (step_dir / manifest.MANIFEST).is_file():
            state, newest_complete_ok = "unverified (no manifest.json: written before manifests)", True
        else:
            wrong = manifest.problem(step_dir, hash_all=args.hash_all)
            state = "intact" if wrong is None else f"damaged: {wrong}"
            newest_complete_ok = wrong is None
        step = json.loads((step_dir / checkpoint.COMPLETE).read_text()).get("step") \
            if (step_dir / checkpoint.COMPLETE).is_file() else "?"
        print(f"{tag}  step {step}  {state}")
    return 0 if newest_complete_ok else 1
