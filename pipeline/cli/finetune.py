"""`coatnet finetune`: prepare the initial weights from a pretraining checkpoint and fine-tune with the trainer."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from pipeline import launch_options
from pipeline.cli.pretrain import add_launch_arguments, launch_kwargs, print_dry_run


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a pretrained CoAtNet (21K -> 1K) at a new resolution through the DeepSpeed trainer",
        description="Consolidate the pretraining checkpoint (DeepSpeed zero_to_fp32), initialise the classifier "
                    "from the pretraining head (finetune.head_init: select | mean | zero), then train the recipe "
                    "with the same trainer, checkpointing and resume as pretraining. KEY=VALUE overrides use dotted "
                    "keys; finetune.* keys go to the fine-tuning section (e.g. finetune.pretrained=runs/pre).",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="recipe YAML (configs/finetune/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    add_launch_arguments(
        p, resume_help="auto: newest complete checkpoint of this fine-tuning run; none: fresh; PATH: a checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    # lazy: `coatnet --help` imports every sub-command module; this one pulls in torch (see pipeline.cli)
    from pipeline.finetune import run
    from pipeline.train.config import ConfigError

    try:
        if args.dry_run:
            return _dry_run(args)
        result = run(args.config, args.overrides, resume=args.resume, force_resume=args.force_resume,
                     **launch_kwargs(args))
    except ConfigError as e:
        print(f"coatnet finetune: invalid config: {e}", file=sys.stderr)
        return 2
    init = result.init
    if args.json:
        print(json.dumps({"output_dir": result.output_dir, "init": {**asdict(init), "path": str(init.path)},
                          "train": asdict(result.train) if result.train else None}, indent=2, default=str))
        return 0
    _print_init(init)
    t = result.train
    m = t.final_metrics
    print(f"{'finished' if t.finished else 'stopped'} at step {t.step}/{t.total_steps}: "
          f"loss {m.get('loss', float('nan')):.4g}, eval top-1 {m.get('eval_top1', float('nan')):.4g}")
    for label, path in (("weights", t.weights), ("EMA weights", t.ema_weights), ("curve", t.curve_png),
                        ("MLflow run", t.mlflow_run_id)):
        if path:
            print(f"{label}: {path}")
    print(f"next: coatnet evaluate --model {result.output_dir} --data {result.train_config.data.root}")
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    # lazy: keeps `coatnet --help` light, as above
    from pipeline.finetune.dry_run import finetune_dry_run

    dry = finetune_dry_run(args.config, args.overrides, world_size=launch_options.from_arguments(args).world_size)
    init = dry.init and {**asdict(dry.init), "path": str(dry.init.path)}
    if not args.json and dry.init:
        _print_init(dry.init)
    print_dry_run(dry.train, config_path=args.config, launcher=args.launcher, as_json=args.json,
                  extra={"output_dir": dry.config.train.output_dir, "init": init, "train": None,
                         "finetune": asdict(dry.config.finetune)})
    return 0


def _print_init(init) -> None:
    head = init.head if isinstance(init.head, dict) else asdict(init.head)
    print(f"initial weights: {init.path} ({'reused' if init.reused else 'prepared'}; from {init.pretrained})")
    print(f"head: {head['mode']}, {head['num_classes']} classes from {head['source_classes']}"
          + (f", {len(head['unmatched'])} without a pretraining class" if head.get("unmatched") else ""))
