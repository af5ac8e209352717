"""What ``evaluate`` can evaluate: a training run's exported weights, or a model from the MLflow registry.

A run directory (local or ``s3://``) is what the trainer exports at the end::

    model_config.json          what rebuilds the model (pipeline.models: name, overrides, a CoAtNet's config)
    model.safetensors          raw fp32 weights
    model_ema.safetensors      fp32 EMA weights (when the recipe keeps an EMA)
    preprocessing.json         written by the fine-tuning stage
    config.yaml                the trainer's resolved recipe (its eval transform, when no preprocessing.json)

Weights are read with safetensors only. A registry URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/ID/model``) is loaded through MLflow's pt2 format, which
MLflow checks to be pickle-free; its preprocessing comes from the metadata logged with it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline import models
from pipeline.artifacts import RunDir
from pipeline.evaluate.preprocessing import Preprocessing
from pipeline.logged_models import load_model, model_metadata
from pipeline.train.config import load_config

WEIGHT_FILES = RunDir.WEIGHT_FILES
REGISTRY_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass
class ModelSource:
    """Models to evaluate under one preprocessing: ``{"raw": m, "ema": m}`` or ``{"registry": m}``."""

    uri: str
    models: dict[str, nn.Module]
    preprocessing: Preprocessing
    num_classes: int
    model_config: dict[str, Any] = field(default_factory=dict)
    weight_files: dict[str, Path] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def is_registry_uri(uri: str) -> bool:
    return str(uri).startswith(REGISTRY_SCHEMES)


def model_from_config(model_config: dict[str, Any]) -> nn.Module:
    """The model of the trainer's ``model_config.json`` (or a bare ``CoAtNetConfig`` dict)."""
    return models.from_model_config(model_config)


def build_model(model_config: dict[str, Any], weights: str | Path) -> nn.Module:
    """The model of its config dict with a safetensors file, in eval mode on CPU (strict load)."""
    model = model_from_config(model_config)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def _img_size(model_config: dict[str, Any]) -> int:
    img = model_config.get("img_size") or (model_config.get("config") or {}).get("img_size") or 224
    return int(img[0] if isinstance(img, list | tuple) else img)


def load_run(uri: str, weights: tuple[str, ...] = ("raw", "ema"), *, cache_dir: str | Path | None = None) -> ModelSource:
    """The exported weights of a training/fine-tuning run directory (local or ``s3://``)."""
    unknown = set(weights) - set(WEIGHT_FILES)
    if unknown:
        raise ValueError(f"weights must be among {sorted(WEIGHT_FILES)}, got {sorted(unknown)}")
    into = Path(cache_dir or tempfile.mkdtemp(prefix="coatnet-eval-"))
    run = RunDir(uri)
    cfg_path = run.fetch(RunDir.MODEL_CONFIG, into)
    if cfg_path is None:
        raise FileNotFoundError(
            f"{uri}: no {RunDir.MODEL_CONFIG}; expected a run directory the trainer exported "
            f"({RunDir.MODEL_CONFIG}, {', '.join(WEIGHT_FILES.values())})"
        )
    model_config = json.loads(cfg_path.read_text())
    files: dict[str, Path] = {}
    for w in weights:
        p = run.fetch(WEIGHT_FILES[w], into)
        if p is not None:
            files[w] = p
    if not files:
        raise FileNotFoundError(f"{uri}: none of {[WEIGHT_FILES[w] for w in weights]} found")
    pre_path = run.fetch(RunDir.PREPROCESSING, into)
    train_cfg = None if pre_path else run.fetch(RunDir.CONFIG, into)
    if pre_path:
        pre = Preprocessing.from_dict(json.loads(pre_path.read_text()))
    elif train_cfg:  # a pretraining run: the trainer's own evaluation transform (center crop and all)
        pre = Preprocessing.from_train_config(load_config(train_cfg, check_data=False))
    else:  # bare weights: what the model config says, defaults otherwise
        extra = {k: tuple(model_config[k]) for k in ("mean", "std") if model_config.get(k)}
        pre = Preprocessing(img_size=_img_size(model_config), **extra)
    models = {w: build_model(model_config, p) for w, p in files.items()}
    return ModelSource(uri, models, pre, int(model_config["num_classes"]), model_config, files)


def load_registered(uri: str, *, tracking_uri: str | None = None) -> ModelSource:
    """A model from the MLflow registry, with the preprocessing logged alongside it."""
    meta = model_metadata(uri, tracking_uri=tracking_uri)
    if "preprocessing" not in meta:
        raise ValueError(f"{uri}: logged without preprocessing metadata; register it with pipeline.registry")
    model = load_model(uri, tracking_uri=tracking_uri)
    return ModelSource(
        uri, {"registry": model}, Preprocessing.from_dict(meta["preprocessing"]), int(meta["num_classes"]),
        dict(meta.get("model_config") or {}), info={k: meta[k] for k in ("top1",) if k in meta},
    )


def load_source(uri: str, weights: tuple[str, ...] = ("raw", "ema"), *, tracking_uri: str | None = None) -> ModelSource:
    if is_registry_uri(uri):
        return load_registered(uri, tracking_uri=tracking_uri)
    return load_run(uri, weights)


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")
