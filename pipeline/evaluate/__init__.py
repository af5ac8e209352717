"""Evaluation of fine-tuned models on a split of shards: metrics (raw and EMA), JSON, plots, MLflow.

    from pipeline.evaluate import evaluate
    report = evaluate("runs/finetune/demo", "data/digits", split="val")
    report["weights"]["ema"]["top1"]
"""

from pipeline.evaluate.evaluate import evaluate, load_evaluation
from pipeline.evaluate.metrics import MetricAccumulator
from pipeline.evaluate.preprocessing import Preprocessing
from pipeline.evaluate.sources import (
    ModelSource,
    build_model,
    is_registry_uri,
    load_registered,
    load_run,
    load_source,
)

__all__ = [
    "MetricAccumulator",
    "ModelSource",
    "Preprocessing",
    "build_model",
    "evaluate",
    "is_registry_uri",
    "load_evaluation",
    "load_registered",
    "load_run",
    "load_source",
]
