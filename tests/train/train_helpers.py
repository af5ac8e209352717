"""The tiny recipe of the training tests (a module of its own: test modules import it, and a module named
``conftest`` is ambiguous when several test areas are collected together)."""

from __future__ import annotations

import json
from pathlib import Path

# A tiny, fast version of the demo recipe: 2 CPU ranks, coatnet_pico at 32x32, no MLflow server.
TINY = [
    "model.name=coatnet_pico",
    "model.img_size=32",
    "data.num_workers=1",
    # Other engineers' streaming jobs may share this machine: do not unlink their shared memory.
    "data.clean_stale_shared_memory=false",
    "train.global_batch_size=32",
    "train.micro_batch_size=16",
    "eval.batch_size=32",
    "eval.max_samples=64",
    "logging.progress_bar=false",
    "logging.mlflow=false",
    "logging.interval_steps=2",
    "schedule.warmup_epochs=0",
    "schedule.warmup_steps=2",
    # The paper's 21K loss, at the LR that makes a few dozen steps of pico show it learning; pinned here so
    # the tests do not move with the demo recipe's own choice of loss and LR.
    "loss.type=sigmoid",
    "loss.label_smoothing=0.0001",
    "optim.lr=1e-2",
]


def tiny(shards: str, out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={shards}", f"output_dir={out}", *extra]


def read_losses(out: Path) -> dict[int, float]:
    """The logged training loss per step of the run in ``out`` (its metrics.jsonl)."""
    rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def read_samples(out: Path) -> dict[int, list[str]]:
    """Keys consumed per optimizer step, over all ranks and micro-batches (sorted per step).

    A step redone after a resume replaces what the interrupted run recorded for it.
    """
    per_step: dict[int, list[str]] = {}
    for f in sorted(Path(out, "samples").glob("rank*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        last = {(r["step"], r["micro"]): r["keys"] for r in rows}  # later lines win
        for (step, _), keys in sorted(last.items()):
            per_step.setdefault(step, []).extend(keys)
    return {k: sorted(v) for k, v in per_step.items()}
