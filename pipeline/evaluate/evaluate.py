"""``evaluate``: one pass over a split of shards, every model of a source scored on the same decoded batches.

For a run directory the raw and the EMA weights are scored together (the images are decoded
once); a registry URI gives one model. Results go to ``{out_dir}/evaluation.json``, one
``predictions_<weights>.npz`` per model (sample keys, labels, top-k, confidence), PNG plots,
and, when asked, to MLflow as metrics and artifacts.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import storage
from pipeline.artifacts import SPLIT_INDEX, EvaluationReport, RunDir, read_manifest
from pipeline.data.manifest import is_kept, masked_indices
from pipeline.evaluate.metrics import MetricAccumulator
from pipeline.evaluate.plots import confusion_or_per_class, reliability_diagram
from pipeline.evaluate.preprocessing import Preprocessing
from pipeline.evaluate.shards import DecodedShards
from pipeline.evaluate.sources import ModelSource, is_registry_uri, load_source
from pipeline.secrets import scrub_text
from pipeline.tracking import configure, run_kwargs

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "coatnet-evaluate"


def _batches(data: str, split: str, pre: Preprocessing, *, batch_size: int, num_workers: int,
             max_samples: int | None, masked: np.ndarray | None = None) -> Iterator[dict]:
    """The split's samples in order, less the ``masked`` indices (duplicates the sharding job found after
    writing them: each image is scored once); ``max_samples`` counts what is yielded."""
    split_uri = storage.join(data, split)
    if not storage.exists(storage.join(split_uri, SPLIT_INDEX)):
        raise FileNotFoundError(f"{data}: no split '{split}' ({split_uri}/{SPLIT_INDEX} missing)")
    # No clean_stale_shared_memory() here: it would unlink the shared memory of other streaming jobs
    # on this node (e.g. a training run next to this evaluation).
    with tempfile.TemporaryDirectory(prefix="coatnet-eval-cache-") as cache:
        kwargs: dict[str, Any] = (
            {"remote": split_uri, "local": cache} if storage.is_remote(split_uri) else {"local": split_uri}
        )
        ds = DecodedShards(pre, shuffle=False, batch_size=batch_size, **kwargs)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, persistent_workers=False)
        seen = 0
        for batch in loader:
            if masked is not None and masked.size:
                keep = is_kept(masked, batch["idx"].numpy())
                if not keep.all():
                    batch = {k: v[torch.from_numpy(keep)] if isinstance(v, torch.Tensor)
                             else [x for x, k_ in zip(v, keep) if k_] for k, v in batch.items()}
            if max_samples is not None and seen + len(batch["label"]) > max_samples:
                keep = max_samples - seen
                batch = {k: v[:keep] for k, v in batch.items()}
            seen += len(batch["label"])
            if len(batch["label"]):
                yield batch
            if max_samples is not None and seen >= max_samples:
                break
        del loader, ds


def evaluate(
    model: str | ModelSource,
    data: str,
    *,
    split: str = "val",
    weights: tuple[str, ...] = ("raw", "ema"),
    batch_size: int = 64,
    num_workers: int = 2,
    max_samples: int | None = None,
    out_dir: str | Path | None = None,
    log_mlflow: bool = True,
    mlflow_run_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` (run directory, ``models:/NAME@ALIAS`` or a loaded ``ModelSource``) on ``data``/``split``.

    Returns the evaluation dict (also written to ``{out_dir}/evaluation.json``): per weights
    (``raw``/``ema`` or ``registry``) top-1, top-5, loss, ECE, per-class accuracy and
    throughput; ``best`` names the weights with the highest top-1.
    """
    source = model if isinstance(model, ModelSource) else load_source(model, weights, tracking_uri=tracking_uri)
    manifest = read_manifest(data)
    if manifest.num_classes != source.num_classes:
        raise ValueError(
            f"the model has {source.num_classes} classes, the dataset {data} has {manifest.num_classes}"
        )
    if out_dir is None:
        out_dir = (Path(RunDir.EVAL) / _slug(source.uri) / split) if is_registry_uri(source.uri) or \
            storage.is_remote(source.uri) else RunDir(source.uri).eval_dir(split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    models = {k: _inference_mode(m, dev) for k, m in source.models.items()}
    acc = {k: MetricAccumulator(source.num_classes) for k in models}
    keys: list[str] = []
    labels: list[np.ndarray] = []
    masked = masked_indices(manifest, split)
    total = manifest.samples(split) - masked.size or None
    if max_samples is not None and total is not None:
        total = min(total, max_samples)
    bar = _progress(total, progress, f"evaluate {split}")
    first = True
    for batch in _batches(manifest.root or data, split, source.preprocessing, batch_size=batch_size,
                          num_workers=num_workers, max_samples=max_samples, masked=masked):
        x = batch["image"].to(dev, torch.float32)
        y = batch["label"]
        for name, m in models.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = m(x)
            dt = time.perf_counter() - t0
            if not first:  # the first batch pays one-off costs (allocations, bias caches)
                acc[name].forward_seconds += dt
            acc[name].update(logits, y)
        first = False
        keys.extend(batch["key"])
        labels.append(y.numpy())
        bar.update(len(y))
    bar.close()

    classes = list(manifest.classes)
    results: dict[str, Any] = {}
    for name, a in acc.items():
        s = a.summary()
        if a.forward_seconds == 0:  # a single batch: its time is all there is
            s.pop("throughput_img_s", None)
        results[name] = s
        topk, conf = a.predictions()
        np.savez_compressed(out / f"predictions_{name}.npz", keys=np.asarray(keys), labels=np.concatenate(labels),
                            topk=topk, confidence=conf)
        reliability_diagram(s["reliability"], s["ece"], out / f"reliability_{name}.png", title=name)
        confusion_or_per_class(a.confusion, classes, out / f"confusion_{name}.png", title=name)
    best = max(results, key=lambda k: results[k]["top1"])
    report = {
        "model": scrub_text(source.uri),
        "data": scrub_text(data),
        "split": split,
        "manifest_hash": manifest.manifest_hash,
        "num_classes": source.num_classes,
        "preprocessing": source.preprocessing.to_dict(),
        "batch_size": batch_size,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "weights": results,
        "best": best,
        "out_dir": str(out),
    }
    if log_mlflow:
        report["mlflow_run_id"] = _log_mlflow(report, out, mlflow_run_id, experiment, tracking_uri)
    EvaluationReport.model_validate(report).write(out)
    for name, s in results.items():
        log.info("%s %s: top1 %.4f top5 %.4f loss %.4f ece %.4f (%d samples)", split, name, s["top1"],
                 s.get("top5", float("nan")), s["loss"], s["ece"], s["num_samples"])
    return report


def _inference_mode(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    try:
        model.eval()
    except NotImplementedError:  # a torch.export graph (registry, pt2): frozen in the eval mode it was exported in
        pass
    return model


def _slug(uri: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in uri).strip("-")[:100]


def _progress(total: int | None, enabled: bool, desc: str):
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, mininterval=2.0)


def _log_mlflow(report: dict, out: Path, run_id: str | None, experiment: str, tracking_uri: str | None) -> str:
    import mlflow  # lazy: MLflow is slow to import; only a logged evaluation (log_mlflow) needs it

    configure(tracking_uri)
    kwargs = run_kwargs(run_id, experiment, f"evaluate-{report['split']}")
    nested = mlflow.active_run() is not None and "run_id" not in kwargs
    with mlflow.start_run(nested=nested, **kwargs) as run:
        split = report["split"]
        metrics = {}
        for name, s in report["weights"].items():
            for k in ("top1", "top5", "loss", "ece", "mean_per_class_accuracy", "throughput_img_s"):
                if k in s and s[k] is not None and np.isfinite(s[k]):
                    metrics[f"eval/{split}/{name}/{k}"] = float(s[k])
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"eval.model": report["model"], "eval.data": report["data"], "eval.best": report["best"]})
        report = {**report, "mlflow_run_id": run.info.run_id}
        EvaluationReport.model_validate(report).write(out)
        mlflow.log_artifacts(str(out), artifact_path=f"evaluation/{split}")
        return run.info.run_id


def load_evaluation(path_or_dir: str | os.PathLike) -> dict[str, Any]:
    """``evaluation.json`` (or the directory holding it) as the dict ``evaluate`` returned."""
    return EvaluationReport.read(os.fspath(path_or_dir)).to_dict()
