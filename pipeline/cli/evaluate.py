"""`coatnet evaluate`: top-1/5, loss, ECE, per-class accuracy and throughput of a run's raw and EMA weights,
or of a registered model (`--model models:/NAME@ALIAS`), on a split of shards."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a fine-tuned run (raw + EMA) or a registered model on a split of shards",
        description="Writes evaluation.json, predictions_<weights>.npz and PNG plots (reliability diagram, "
                    "confusion matrix or per-class accuracy) to --out, and logs metrics and files to MLflow.",
    )
    p.add_argument("--model", required=True, metavar="DIR|URI",
                   help="a run directory (local or s3://) with model_config.json + model[_ema].safetensors, "
                        "or a registry URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model")
    p.add_argument("--data", required=True, metavar="URI", help="dataset root (manifest.json + MDS splits)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--weights", default="raw,ema", help="for a run directory: raw, ema or raw,ema (default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding workers (default: 2)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: DIR/eval/SPLIT or ./eval/...)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--mlflow-run-id", default=None, help="log into this run (default: a new run)")
    p.add_argument("--experiment", default="coatnet-evaluate", help="MLflow experiment of a new run")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    # lazy: `coatnet --help` imports every sub-command module; this one pulls in torch (see pipeline.cli)
    from pipeline.evaluate import evaluate

    weights = tuple(w.strip() for w in args.weights.split(",") if w.strip())
    try:
        report = evaluate(args.model, args.data, split=args.split, weights=weights, batch_size=args.batch_size,
                          num_workers=args.workers, max_samples=args.max_samples, out_dir=args.out,
                          log_mlflow=not args.no_mlflow, mlflow_run_id=args.mlflow_run_id,
                          experiment=args.experiment, tracking_uri=args.tracking_uri, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"coatnet evaluate: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} on {report['data']} [{report['split']}]")
    print(f"{'weights':<10}{'top1':>8}{'top5':>8}{'loss':>8}{'ECE':>8}{'img/s':>9}{'samples':>9}")
    for name, s in report["weights"].items():
        print(f"{name:<10}{s['top1']:>8.4f}{s.get('top5', float('nan')):>8.4f}{s['loss']:>8.4f}{s['ece']:>8.4f}"
              f"{s.get('throughput_img_s', float('nan')):>9.1f}{s['num_samples']:>9}")
    print(f"results: {report['out_dir']}")
    if report.get("mlflow_run_id"):
        print(f"MLflow run: {report['mlflow_run_id']}")
    return 0
