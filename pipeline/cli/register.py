"""`coatnet register`: log a fine-tuned run's evaluated weights to MLflow, register them as
coatnet-<variant>-<dataset>, set `candidate`, and move `champion` only past the promotion gate."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from pipeline.artifacts import RunDir


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "register",
        help="register an evaluated fine-tuned model in the MLflow registry (candidate/champion aliases)",
        description="The model is logged in MLflow's pt2 format with its signature, input example, preprocessing, "
                    "config and safetensors weights. Every version gets the alias 'candidate'; 'champion' moves "
                    "to it only when its top-1 beats the current champion's by more than --margin.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the fine-tuning run directory")
    p.add_argument("--evaluation", default=None, metavar="FILE|DIR",
                   help="evaluation.json from `coatnet evaluate` (default: DIR/eval/val/evaluation.json)")
    p.add_argument("--weights", choices=("best", "raw", "ema"), default="best",
                   help="which weights to register (default: best top-1 of the evaluation)")
    p.add_argument("--name", default=None, help="registered model name (default: coatnet-<variant>-<dataset>)")
    p.add_argument("--dataset", default=None, help="dataset part of the default name (default: from the manifest)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="top-1 the candidate must gain over the champion to be promoted (default: 0)")
    p.add_argument("--experiment", default="coatnet-finetune", help="MLflow experiment of a new run")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    # lazy: `coatnet --help` imports every sub-command module; this one pulls in torch (see pipeline.cli)
    from pipeline.registry import register as register_model

    evaluation = args.evaluation or RunDir(args.model).evaluation("val")
    try:
        r = register_model(args.model, evaluation, name=args.name, dataset=args.dataset, weights=args.weights,
                           margin=args.margin, experiment=args.experiment, tracking_uri=args.tracking_uri)
    except (FileNotFoundError, ValueError) as e:
        print(f"coatnet register: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(r), "promoted": r.promoted}, indent=2))
        return 0
    g = r.gate
    print(f"registered {r.name} version {r.version} ({r.model_uri}), aliases: {', '.join(r.aliases)}")
    champ = "none" if g.champion_top1 is None else f"{g.champion_top1:.4f} (v{g.champion_version})"
    print(f"gate: top-1 {g.candidate_top1:.4f} vs champion {champ}, margin {g.margin}: "
          f"{'promoted to champion' if g.promoted else 'champion kept'}")
    print(f"load: mlflow.pytorch.load_model('models:/{r.name}@candidate')")
    return 0
