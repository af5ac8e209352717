"""Log a fine-tuned CoAtNet to MLflow, register it, and move the ``candidate``/``champion`` aliases.

Format: MLflow's ``pt2`` PyTorch flavour (``torch.export``). It loads back with both
``mlflow.pytorch.load_model`` and ``mlflow.pyfunc.load_model`` and MLflow checks the archive
is pickle-free before loading it, so pulling a model from the registry never unpickles
data. The batch dimension is exported dynamic (MLflow marks dims of the example that are
> 1 as ``Dim.AUTO``, hence the batch-2 example). The same weights are attached as
safetensors with the model config, the class names, the preprocessing and the evaluation,
so the model can be rebuilt in eager PyTorch without MLflow.

Gate: every new version gets ``candidate``; ``champion`` moves to it only when its top-1
beats the current champion's by more than ``margin``. The decision, both scores and the
margin are recorded as tags on the version.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline import models
from pipeline.artifacts import EvaluationReport, Manifest, RunDir, read_manifest
from pipeline.evaluate import load_run
from pipeline.finetune import read_lineage
from pipeline.registry.lineage import lineage_tags
from pipeline.secrets import flatten, scrub, scrub_text
from pipeline.tracking import configure, run_kwargs

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
DEFAULT_EXPERIMENT = "coatnet-finetune"
SCORE_TAG = "eval.top1"
CLASSES_FILE = "classes.json"  # attached to the logged model: the class names in label order


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    candidate_top1: float
    champion_top1: float | None
    champion_version: str | None  # the champion before this decision
    margin: float

    def tags(self) -> dict[str, str]:
        return {
            "gate.decision": "promoted" if self.promoted else "kept",
            "gate.margin": repr(self.margin),
            "gate.candidate_top1": repr(self.candidate_top1),
            "gate.champion_top1": "none" if self.champion_top1 is None else repr(self.champion_top1),
            "gate.previous_champion": self.champion_version or "none",
        }


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str
    model_uri: str  # models:/NAME/VERSION
    gate: GateDecision

    @property
    def promoted(self) -> bool:
        return self.gate.promoted


def model_name(variant: str, dataset: str) -> str:
    """``coatnet-<variant>-<dataset>``: ``("coatnet_2", "imagenet-1k")`` -> ``coatnet-2-imagenet-1k``."""
    variant = re.sub(r"^coatnet[_-]?", "", variant.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", f"{variant}-{dataset.lower()}").strip("-")
    return f"coatnet-{slug}"


def champion(name: str, *, tracking_uri: str | None = None) -> tuple[str, float] | None:
    """``(version, top1)`` of the current champion, or ``None``."""
    configure(tracking_uri)
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return mv.version, float(mv.tags[SCORE_TAG])


def gate(name: str, version: str, top1: float, *, margin: float = 0.0, tracking_uri: str | None = None) -> GateDecision:
    """Set ``candidate`` on ``version``; move ``champion`` to it iff ``top1 > champion_top1 + margin``."""
    if margin < 0:
        raise ValueError(f"promotion margin must be >= 0, got {margin}")
    configure(tracking_uri)
    client = mlflow.MlflowClient()
    current = champion(name, tracking_uri=tracking_uri)
    champ_version, champ_top1 = current if current else (None, None)
    promoted = champ_top1 is None or top1 > champ_top1 + margin
    decision = GateDecision(promoted, float(top1), champ_top1, champ_version, float(margin))
    for k, v in decision.tags().items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, CANDIDATE, version)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info(
        "%s v%s top1=%.4f vs champion %s (%s), margin %g: %s",
        name, version, top1, champ_version, champ_top1, margin, "promoted" if promoted else "kept",
    )
    return decision


def _signature(img_size: int, num_classes: int):
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, img_size, img_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )


def register_model(
    model: torch.nn.Module,
    *,
    name: str,
    top1: float,
    img_size: int,
    num_classes: int,
    weights_file: str | Path,
    model_config: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    classes: list[str] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    lineage: Mapping[str, str | None] | None = None,
    margin: float = 0.0,
    run_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    validate: bool = True,
) -> RegisteredModel:
    """Log ``model`` (eval mode, CPU) to an MLflow run, register it as ``name`` and apply the gate.

    ``run_id``: log into that run (the fine-tuning run) when it exists on this tracking
    server; otherwise a new run is started in ``experiment`` and the id is kept as lineage.
    ``validate``: MLflow reloads the saved model and runs the input example through it.
    """
    configure(tracking_uri)
    model = model.eval().cpu()
    tags = lineage_tags(**dict(lineage or {}))
    meta = {
        "preprocessing": dict(preprocessing),
        "img_size": img_size,
        "num_classes": num_classes,
        "model_config": scrub(dict(model_config)),
        "weights_file": Path(weights_file).name,
        "top1": top1,
    }
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(**run_kwargs(run_id, experiment, f"register-{name}")) as run:
        extra = [str(weights_file)]
        for fname, obj in (
            (RunDir.MODEL_CONFIG, meta["model_config"]),
            (RunDir.PREPROCESSING, meta["preprocessing"]),
            (CLASSES_FILE, classes),
            (RunDir.EVALUATION, scrub(dict(evaluation)) if evaluation else None),
        ):
            if obj is not None:
                p = Path(tmp, fname)
                p.write_text(json.dumps(obj, indent=2))
                extra.append(str(p))
        if params:
            flat = {k: str(v)[:6000] for k, v in flatten(scrub(dict(params))).items()}
            existing = run.data.params
            mlflow.log_params({k: v for k, v in flat.items() if k not in existing})
        mlflow.set_tags(tags)
        # The example only fixes shapes for torch.export; zeros keep the stored JSON small.
        example = np.zeros((2, 3, img_size, img_size), dtype=np.float32)
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pt2",
            signature=_signature(img_size, num_classes),
            input_example=example,
            extra_files=extra,
            metadata=meta,
            registered_model_name=name,
            pip_requirements=_pip_requirements(str(model_config.get("name", ""))),
            validate_serving_input=validate,
        )
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        client.set_model_version_tag(name, version, SCORE_TAG, repr(float(top1)))
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        decision = gate(name, version, top1, margin=margin, tracking_uri=tracking_uri)
        aliases = tuple(client.get_model_version(name, version).aliases)
        return RegisteredModel(name, version, aliases, run.info.run_id, f"models:/{name}/{version}", decision)


def _pip_requirements(model: str) -> list[str]:
    # The pt2 program loads without the model's code; timm is what rebuilds a timm model from the attached
    # safetensors and model_config.json in eager PyTorch.
    reqs = []
    for pkg in ("torch", "mlflow", "numpy", "safetensors", *(("timm",) if models.is_timm(model) else ())):
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return reqs


def dataset_name(manifest: Manifest | None) -> str:
    """A short dataset name from a manifest's ``source``: ``digits:size=32`` -> ``digits``."""
    source = str((manifest and manifest.source) or "dataset")
    kind, _, rest = source.partition(":")
    if kind in ("imagefolder", "folder", "s3", "file") and rest:
        return rest.rstrip("/").rsplit("/", 1)[-1] or kind
    return kind


def register(
    model_dir: str,
    evaluation: Mapping[str, Any] | str | Path,
    *,
    name: str | None = None,
    dataset: str | None = None,
    weights: str = "best",
    margin: float = 0.0,
    lineage: Mapping[str, str | None] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
) -> RegisteredModel:
    """Register the fine-tuned weights of ``model_dir`` that ``evaluation`` scored, and apply the gate.

    ``weights``: ``raw``, ``ema`` or ``best`` (the higher top-1 in ``evaluation``). The name
    defaults to ``coatnet-<variant>-<dataset>``; lineage comes from the run's ``finetune.json``
    (pretraining and fine-tuning run ids, shard manifest hash) plus ``lineage``.
    """
    ev = EvaluationReport.model_validate(dict(evaluation)) if isinstance(evaluation, Mapping) \
        else EvaluationReport.read(evaluation)
    which = ev.best if weights == "best" else weights
    if which not in ev.weights:
        raise ValueError(f"the evaluation has no results for weights '{which}' (has {sorted(ev.weights)})")
    if which not in ("raw", "ema"):
        raise ValueError(f"register takes a run directory's raw or EMA weights, not {which!r}")
    if ev.model != scrub_text(str(model_dir)):
        log.warning("the evaluation was of %s, registering %s", ev.model, model_dir)
    source = load_run(str(model_dir), (which,))
    if source.preprocessing.to_dict() != ev.preprocessing:
        raise ValueError(
            f"{model_dir}: its preprocessing {source.preprocessing.to_dict()} differs from the evaluation's "
            f"{ev.preprocessing}; evaluate it again before registering"
        )
    manifest = read_manifest(ev.data) if ev.data else None
    name = name or model_name(str(source.model_config.get("name", "model")), dataset or dataset_name(manifest))
    lin = {k: v for k, v in read_lineage(str(model_dir)).items() if v}
    lin.setdefault("manifest_hash", ev.manifest_hash)
    lin.update({k: v for k, v in dict(lineage or {}).items() if v})
    params: dict[str, Any] = {}
    record = RunDir(str(model_dir).rstrip("/")).read_finetune_record()
    if record:
        params = record.get("config") or {}
    metrics = ev.weights[which]
    result = register_model(
        source.models[which],
        name=name,
        top1=float(metrics["top1"]),
        img_size=source.preprocessing.img_size,
        num_classes=source.num_classes,
        weights_file=source.weight_files[which],
        model_config=source.model_config,
        preprocessing=source.preprocessing.to_dict(),
        classes=list(manifest.classes) if manifest and manifest.classes else None,
        evaluation={**ev.to_dict(), "registered_weights": which},
        params=params,
        lineage=lin,
        margin=margin,
        run_id=lin.get("finetune_run_id"),
        experiment=experiment,
        tracking_uri=tracking_uri,
    )
    mlflow.MlflowClient().set_model_version_tag(result.name, result.version, "eval.weights", which)
    return result
