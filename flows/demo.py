"""`make demo`: the whole job end to end on embedded defaults, with no server to start by hand.

Runs the Prefect flow ``pretrain-coatnet`` on Prefect's ephemeral API (its database under
``demo-output/prefect``), with a local object-store directory (``demo-output/store``), MLflow in
``sqlite:///mlflow.db`` in the working directory, a local Ray for sharding, and DeepSpeed with 2 CPU ranks
on the bundled digits data in its 21K-to-1K shape. It ends by printing what it made and how to look at it.

A second run reuses the shards (the shard cache) and registers a new version of the same model. A demo
that was interrupted resumes its training from the newest checkpoint when started again with the same
``--run-name``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEMO_DIR = Path("demo-output")
STORE = DEMO_DIR / "store"
WORK_DIR = DEMO_DIR / "runs"
PREFECT_HOME = DEMO_DIR / "prefect"
TRACKING_URI = "sqlite:///mlflow.db"


def _prepare_env() -> None:
    """Settings that must be in place before Prefect, DeepSpeed or MLflow are imported."""
    # Ephemeral API: never a server or profile the user may have configured elsewhere. Prefect creates only
    # the last level of its home directory.
    PREFECT_HOME.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(PREFECT_HOME.resolve())
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_PROFILE", None)
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    # The ephemeral server starts in a subprocess: slow on 2 busy cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; no telemetry
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MLFLOW_TRACKING_URI", TRACKING_URI)
    # No GPU is used by the demo; keep CPU thread pools from oversubscribing 2 cores across 2 ranks.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _figures(metrics: Mapping[str, Any], keys: Sequence[str]) -> str:
    shown = [f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics]
    if not shown:  # a trainer that names its figures differently still shows them
        shown = [f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:6] if isinstance(v, int | float)]
    return ", ".join(shown)


TRAIN_KEYS = ("steps", "loss", "eval_loss", "eval_top1", "eval_top5", "images_per_s", "tflops")


def report(result: Mapping[str, Any], *, elapsed_s: float | None = None) -> str:
    """What the demo made, as the lines it prints at the end."""
    lines = ["", "=" * 78, f"CoAtNet demo finished: run {result['run_name']}"
             + (f" in {elapsed_s / 60:.1f} min" if elapsed_s else ""), "=" * 78]
    for ds in result.get("datasets", []):
        counts = ", ".join(f"{k} {v}" for k, v in (ds.get("samples") or {}).items())
        cache = "reused (cache hit)" if ds.get("skipped") else "written by this run"
        lines.append(f"shards    {ds.get('source')}: {ds.get('uri')}  [{ds.get('num_classes')} classes; {counts}; {cache}]")
    for stage in ("pretrain", "finetune"):
        tr = result.get(stage) or {}
        resumed = tr.get("resumed_from_step")
        lines.append(
            f"{stage:<9} {_figures(tr.get('metrics') or {}, TRAIN_KEYS)}"
            + (f"  (resumed from step {resumed})" if resumed else "")
            + f"\n          output {tr.get('output_dir')}, MLflow run {tr.get('mlflow_run_id')}"
        )
    ev = result.get("evaluation") or {}
    if "top1" in ev:
        lines.append(f"evaluate  top-1 {ev['top1']:.4f}" + (f", top-5 {ev['top5']:.4f}" if "top5" in ev else "")
                     + f" on {ev.get('split', 'val')} ({ev.get('samples', '?')} images) of the fine-tuned model")
    reg = result.get("registered") or {}
    if reg:
        lines.append(f"registry  model {reg.get('name')} version {reg.get('version')}, aliases "
                     f"{', '.join(reg.get('aliases') or []) or '-'}  (load: models:/{reg.get('name')}@candidate)")
    lines += [
        "",
        "Look at it:",
        f"  Prefect UI: PREFECT_HOME={PREFECT_HOME} .venv/bin/prefect server start   then http://127.0.0.1:4200/runs",
        f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {TRACKING_URI}"
        "   then http://127.0.0.1:5000"
        + (f"/#/models/{reg.get('name')}" if reg else ""),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--run-name", default=None,
                        help="name of the run (default: demo-<time>); the same name resumes an interrupted demo")
    parser.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    _prepare_env()
    # lazy: Prefect, DeepSpeed and MLflow read the settings _prepare_env just made when they are imported
    from flows.pretrain import pretrain_coatnet

    run_name = args.run_name or time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"CoAtNet demo: run {run_name}; Prefect (ephemeral API) records in {PREFECT_HOME}, "
          f"MLflow in {TRACKING_URI}, shards and checkpoints under {DEMO_DIR}/", flush=True)
    t0 = time.monotonic()
    result = pretrain_coatnet(
        store=str(STORE),
        work_dir=str(WORK_DIR),
        run_name=run_name,
        mlflow_tracking_uri=TRACKING_URI,
        pretrain_overrides=args.pretrain_override,
        finetune_overrides=args.finetune_override,
    )
    print(report(result, elapsed_s=time.monotonic() - t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
