"""`coatnet pretrain`: validate a recipe, print its plan (--dry-run), or train it with a launcher."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any

from pipeline import launch_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a CoAtNet with DeepSpeed ZeRO from streamed shards",
        description="Pretrain with DeepSpeed ZeRO from MDS shards. KEY=VALUE overrides use dotted config keys "
                    "(e.g. train.epochs=3 deepspeed.zero_stage=3 data.root=s3://bucket/shards).",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="recipe YAML (configs/pretrain/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    add_launch_arguments(
        p, resume_help="auto: newest complete checkpoint (local, then checkpoint.upload_uri); none: fresh run; "
                       "PATH: a checkpoint directory or checkpoints root (default: auto)")
    p.add_argument("--json", action="store_true", help="print the result (or the dry-run plan) as JSON")
    p.set_defaults(func=main)


def add_launch_arguments(p: argparse.ArgumentParser, *, resume_help: str) -> None:
    """Resume and dry-run flags, then the launch options' (pipeline.launch_options): shared by every
    command that trains (pretrain, finetune)."""
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH", help=resume_help)
    p.add_argument("--force-resume", action="store_true",
                   help="resume even if the checkpoint was written by a different recipe (config hash)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the resolved plan without training; what cannot be "
                        "checked from here (shards, credentials) is a warning")
    launch_options.add_arguments(p)


def launch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``launcher``, ``nproc`` and ``ray`` for ``pipeline.train.launch`` from the launch flags."""
    return launch_options.from_arguments(args).launch_kwargs(args.ray_address or os.environ.get("RAY_ADDRESS"))


def main(args: argparse.Namespace) -> int:
    # lazy: `coatnet --help` imports every sub-command module; this one pulls in torch (see pipeline.cli)
    from pipeline.train.config import ConfigError

    try:
        if args.dry_run:
            return _dry_run(args)
        # lazy: keeps `coatnet --help` light, as above
        from pipeline.train.launcher import launch

        result = launch(args.config, args.overrides, resume=args.resume, force_resume=args.force_resume,
                        **launch_kwargs(args))
    except ConfigError as e:
        print(f"coatnet pretrain: invalid config: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a failed rank or a refused resume: its message, not a traceback
        # lazy: keeps `coatnet --help` light, as above
        from pipeline.train.checkpoint import ResumeError
        from pipeline.train.launcher import LaunchError

        if not isinstance(e, LaunchError | ResumeError):
            raise
        print(f"coatnet pretrain: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        m = result.final_metrics
        print(f"{'finished' if result.finished else 'stopped'} at step {result.step}/{result.total_steps}: "
              f"loss {m.get('loss', float('nan')):.4g}, eval top-1 {m.get('eval_top1', float('nan')):.4g}")
        print(f"checkpoint: {result.last_checkpoint}")
        for label, path in (("weights", result.weights), ("EMA weights", result.ema_weights),
                            ("curve", result.curve_png), ("MLflow run", result.mlflow_run_id)):
            if path:
                print(f"{label}: {path}")
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    # lazy: keeps `coatnet --help` light, as above
    from pipeline.train.dry_run import dry_run

    dry = dry_run(args.config, args.overrides, world_size=launch_options.from_arguments(args).world_size)
    print_dry_run(dry, config_path=args.config, launcher=args.launcher, as_json=args.json)
    return 0


def print_dry_run(dry, *, config_path: str, launcher: str, as_json: bool, extra: dict | None = None) -> None:
    """The plan on stdout (text, or JSON with ``--json``); each warning on stderr as ``WARNING: ...``."""
    # lazy: keeps `coatnet --help` light, as above
    from pipeline.train.engine import compile_choice, ds_config, optimizer_choice, zero_layout

    cfg, p = dry.config, dry.plan
    info = {"config": config_path, "config_hash": cfg.config_hash, "launcher": launcher, **p.to_dict(),
            "train_gflops_per_image": None if p.train_flops_per_image is None else p.train_flops_per_image / 1e9,
            "memory_gib_per_rank": dry.memory_gib_per_rank, "samples_from": dry.samples_from,
            "classes_from": dry.classes_from, "deepspeed": ds_config(cfg, p),
            "optimizer": dict(zip(("impl", "reason"), optimizer_choice(cfg), strict=True)),
            "compile": dict(zip(("enabled", "reason"), compile_choice(cfg), strict=True)),
            "zero_layout": dict(zip(("settings", "reason"), zero_layout(cfg, p), strict=True))}
    if as_json:
        print(json.dumps({**(extra or {}), "plan": info, "warnings": list(dry.warnings), "resolved": cfg.to_dict()},
                         indent=2, default=str))
    else:
        _print_plan(dry, info, config_path, launcher)
    sys.stdout.flush()
    for w in dry.warnings:
        print(f"WARNING: {w}", file=sys.stderr)


def _print_plan(dry, info: dict, config_path: str, launcher: str) -> None:
    cfg, p = dry.config, dry.plan
    memory = ("? (no estimate, see the warnings)" if dry.memory_gib_per_rank is None else
              f"~{dry.memory_gib_per_rank:.0f} GiB per rank (estimate of pipeline.cluster.sizing: ZeRO-"
              f"{cfg.deepspeed.zero_stage} states, bf16, micro-batch {p.micro_batch_size} of activations"
              f"{', checkpointed' if cfg.model.grad_checkpointing else ''})")
    print(f"recipe     {cfg.name} ({config_path}), config hash {cfg.config_hash}")
    print(f"model      {cfg.model.name} @ {cfg.model.img_size}px, {p.num_classes} classes (from {dry.classes_from}), "
          f"{_fmt(p.params)} params, {_fmt(p.macs_per_image)} MACs/image "
          f"({_fmt(p.train_flops_per_image)} training FLOPs/image)")
    print(f"world      {p.world_size} ranks via {launcher}, ZeRO-{cfg.deepspeed.zero_stage}")
    print(f"batch      global {p.global_batch_size} = micro {p.micro_batch_size} x accumulation "
          f"{p.grad_accum_steps} x {p.world_size} ranks")
    print(f"steps      {p.total_steps} ({p.steps_per_epoch}/epoch over {p.train_samples} samples), "
          f"warm-up {p.warmup_steps}, {cfg.schedule.type} to {cfg.optim.min_lr:g} from {cfg.optim.lr:g}")
    print(f"samples    from {dry.samples_from}")
    print(f"memory     {memory}")
    print(f"data       {cfg.data.root} ({cfg.data.train_split} / {cfg.data.eval_split})")
    print(f"output     {cfg.output_dir}")
    print("deepspeed  " + json.dumps(info["deepspeed"]))
    print(f"optimizer  AdamW {info['optimizer']['impl']}: {info['optimizer']['reason']}")
    print(f"compile    {'on' if info['compile']['enabled'] else 'off'}: {info['compile']['reason']}")
    if cfg.deepspeed.zero_stage:
        layout = ", ".join(f"{k}={v}" for k, v in info["zero_layout"]["settings"].items())
        print(f"zero       {layout}: {info['zero_layout']['reason']}")


def _fmt(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
