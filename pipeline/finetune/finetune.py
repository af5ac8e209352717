"""Fine-tuning: prepare the initial weights from a pretraining checkpoint, then run the same trainer.

``prepare_init_weights`` consolidates the pretraining checkpoint (DeepSpeed's zero_to_fp32),
builds the fine-tuning classifier (``head.py``), checks before any compute that the result
fits the fine-tuning model once its relative-position tables are resized (``coatnet``'s
adaptation, which the model's load hook applies), and writes
``{output_dir}/finetune/init.safetensors``. ``run`` then hands the recipe to
``pipeline.train.launch`` with ``model.init_weights`` pointing at that file: checkpointing,
resume, EMA and export are the trainer's. A rerun with the same inputs reuses the prepared
file (its fingerprint is kept next to it), so resuming an interrupted fine-tune does not
consolidate again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline import models, storage
from pipeline.artifacts import RunDir, TrainResult, read_manifest
from pipeline.data.synsets import synsets
from pipeline.evaluate.preprocessing import Preprocessing
from pipeline.finetune.config import FinetuneConfig, load_finetune_config
from pipeline.finetune.consolidate import CheckpointNotFound, consolidate, resolve_checkpoint
from pipeline.finetune.head import HeadInit, class_children, init_head
from pipeline.secrets import scrub, scrub_text
from pipeline.train import launch
from pipeline.train.config import ConfigError

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"


@dataclass
class PreparedInit:
    path: Path
    head: HeadInit | dict
    pretrained: str
    checkpoint: str | None  # the consolidated checkpoint tag directory, when there was one
    pretrain_run_id: str | None
    fingerprint: str
    reused: bool = False


@dataclass
class FinetuneResult:
    output_dir: str
    init: PreparedInit
    train: TrainResult
    preprocessing: dict = field(default_factory=dict)
    train_config: Any | None = None  # the TrainConfig handed to the trainer (init_weights set)

    @property
    def finished(self) -> bool:
        return self.train.finished


# --- the pretraining side ---------------------------------------------------------------------
def load_source_classes(spec: str) -> tuple[list[str], Any, list[str] | None, str | None]:
    """``(classes, parent_map, parent_classes, manifest_hash)`` of the pretraining label space."""
    if spec.startswith(TIMM_PREFIX):
        return list(synsets(spec[len(TIMM_PREFIX):])), None, None, None
    m = read_manifest(spec)
    return list(m.classes), m.parent_map, m.parent_classes, m.manifest_hash


def _load_safetensors(uri: str) -> dict[str, torch.Tensor]:
    if not storage.is_remote(uri):
        return load_file(uri)
    with tempfile.TemporaryDirectory() as tmp:
        return load_file(str(storage.download_file(uri, Path(tmp, RunDir.WEIGHTS))))


def _pretrain_run_id(pretrained: str) -> str | None:
    """The pretraining run's MLflow id, from the trainer's result.json in ``pretrained`` or up to 2 levels up."""
    base = pretrained.rstrip("/")
    for _ in range(3):
        try:
            if RunDir(base).exists(RunDir.RESULT):
                return RunDir(base).read_result().mlflow_run_id
        except Exception:  # noqa: BLE001 - lineage is best effort; training does not depend on it
            return None
        base = base.rpartition("/")[0]
        if not base:
            break
    return None


def load_pretrained_state(pretrained: str, work_dir: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The pretrained fp32 state dict and the checkpoint it was consolidated from (None for a weights file)."""
    if pretrained.endswith(".safetensors"):
        if not storage.exists(pretrained):
            raise ConfigError(f"finetune.pretrained: {pretrained} does not exist")
        return _load_safetensors(pretrained), None
    try:
        root, tag = resolve_checkpoint(pretrained)
    except CheckpointNotFound as e:
        exported = RunDir(pretrained).weights("raw")
        if storage.exists(exported):
            log.warning("%s has no DeepSpeed checkpoint; using its exported %s", pretrained, RunDir.WEIGHTS)
            return _load_safetensors(exported), None
        raise ConfigError(f"finetune.pretrained: {e}") from e
    out = consolidate(root, work_dir / "pretrained_fp32.safetensors", tag=tag)
    return load_file(str(out)), storage.join(root, tag)


# --- preparing the initial weights -------------------------------------------------------------
def _fingerprint(cfg: FinetuneConfig, target_hash: str | None) -> str:
    ft, m = cfg.finetune, cfg.train.model
    blob = json.dumps({"finetune": asdict(ft), "model": [m.name, m.num_classes, m.img_size, m.overrides],
                       "target": target_hash, "data": cfg.train.data.root}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _target_model(cfg: FinetuneConfig, num_classes: int) -> torch.nn.Module:
    """The fine-tuning model on the meta device: its shapes and its classifier's keys, nothing allocated."""
    m = cfg.train.model
    return models.create_model(m.name, num_classes=num_classes, img_size=m.img_size,
                               drop_path_rate=m.drop_path_rate, overrides=m.overrides, device="meta")


def _classifier_keys(model: torch.nn.Module, cfg: FinetuneConfig) -> tuple[str, str]:
    try:
        return models.classifier_keys(model)
    except ValueError as e:
        raise ConfigError(f"model.name: {cfg.train.model.name} cannot be fine-tuned from another label space: "
                          f"{e}") from None


def _check_fits(state: dict[str, torch.Tensor], cfg: FinetuneConfig, model: torch.nn.Module) -> None:
    """Fail before compute when the prepared weights cannot load strictly into the fine-tuning model."""
    m = cfg.train.model
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        adapted = models.adapt_state_dict(state, model)
    except ValueError as e:
        raise ConfigError(f"finetune.pretrained does not fit model.name={m.name}: {e}") from e
    missing, unexpected = sorted(set(want) - set(adapted)), sorted(set(adapted) - set(want))
    wrong = sorted(k for k in set(want) & set(adapted) if tuple(adapted[k].shape) != want[k])
    if missing or unexpected or wrong:
        raise ConfigError(
            f"finetune.pretrained does not fit model.name={m.name} at img_size={m.img_size}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {wrong[:5]} "
            "(is it a checkpoint of the same variant?)"
        )


def prepare_init_weights(cfg: FinetuneConfig, *, force: bool = False) -> PreparedInit:
    """Write ``{output_dir}/finetune/init.safetensors`` (consolidated, head mapped) unless already there."""
    work = RunDir(cfg.train.output_dir).local(RunDir.FINETUNE_DIR)
    work.mkdir(parents=True, exist_ok=True)
    target = read_manifest(cfg.train.data.root)
    target_classes = list(target.classes)
    num_classes = cfg.train.model.num_classes or target.num_classes
    if num_classes != len(target_classes):
        raise ConfigError(f"model.num_classes={num_classes} but the dataset has {len(target_classes)} classes")
    fp = _fingerprint(cfg, target.manifest_hash)
    init, meta_path = work / RunDir.INIT_WEIGHTS, work / RunDir.INIT_META
    if not force and init.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp:
            log.info("reusing prepared initial weights %s", init)
            return PreparedInit(init, meta["head"], meta["pretrained"], meta.get("checkpoint"),
                                meta.get("pretrain_run_id"), fp, reused=True)

    ft = cfg.finetune
    model = _target_model(cfg, num_classes)
    keys = _classifier_keys(model, cfg)  # before the consolidation: a model without one fails at once
    state, checkpoint = load_pretrained_state(ft.pretrained, work)
    if ft.head_init == "zero":
        children: list[list[int]] = [[] for _ in target_classes]
    else:
        classes, parent_map, parent_classes, _ = load_source_classes(ft.source_classes or "")
        head_rows = state[keys[0]].shape[0] if keys[0] in state else None
        if head_rows is not None and head_rows != len(classes):
            raise ConfigError(
                f"finetune.source_classes: {ft.source_classes} has {len(classes)} classes but the pretrained "
                f"head has {head_rows} rows"
            )
        children = class_children(classes, target_classes, parent_map, parent_classes)
    state, head = init_head(state, children, ft.head_init, target_classes, keys)
    if head.unmatched:
        log.warning("%d fine-tuning classes have no pretraining class (zero rows): %s",
                    len(head.unmatched), head.unmatched[:10])
    _check_fits(state, cfg, model)
    tmp = init.with_name(f".{init.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(init)

    prepared = PreparedInit(init, head.to_dict(), scrub_text(ft.pretrained), checkpoint and scrub_text(checkpoint),
                            _pretrain_run_id(ft.pretrained), fp)
    meta_path.write_text(json.dumps({**asdict(prepared), "path": str(init)}, indent=2))
    return prepared


# --- running -------------------------------------------------------------------------------------
def run(
    config: str | os.PathLike | FinetuneConfig,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    launcher: str = "local",
    nproc: int | None = None,
    resume: str = "auto",
    **launch_kwargs: Any,
) -> FinetuneResult:
    """Fine-tune: prepare ``init.safetensors``, then ``pipeline.train.launch`` the recipe with it."""
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config, list(overrides))
    if isinstance(config, FinetuneConfig) and overrides:
        raise ValueError("overrides go with a config path; apply them before building a FinetuneConfig")
    prepared = prepare_init_weights(cfg)
    train_cfg = cfg.train.replace(model=dataclasses.replace(cfg.train.model, init_weights=str(prepared.path)))
    run_dir = RunDir(train_cfg.output_dir)
    out = run_dir.path
    pre = Preprocessing.from_train_config(train_cfg).to_dict()
    run_dir.write_json(RunDir.PREPROCESSING, pre)
    record = {"init": {**asdict(prepared), "path": str(prepared.path)}, "config": scrub(cfg.to_dict()),
              "data_manifest_hash": _manifest_hash(train_cfg.data.root)}
    run_dir.write_json(RunDir.FINETUNE_RECORD, record, default=str)

    result = launch(train_cfg, [], launcher=launcher, nproc=nproc, resume=resume, **launch_kwargs)
    record["finetune_run_id"] = result.mlflow_run_id
    record["train"] = {"finished": result.finished, "step": result.step, "total_steps": result.total_steps,
                       "final_metrics": result.final_metrics}
    run_dir.write_json(RunDir.FINETUNE_RECORD, record, default=str)
    return FinetuneResult(str(out), prepared, result, pre, train_cfg)


def _manifest_hash(root: str) -> str | None:
    return read_manifest(root).manifest_hash


def read_lineage(run_dir: str) -> dict[str, str | None]:
    """Lineage of a training run directory: its ``finetune.json``, else the trainer's ``result.json``."""
    run = RunDir(run_dir)
    rec: dict[str, Any] = run.read_finetune_record() or {}
    run_id = rec.get("finetune_run_id")
    if not run_id and run.exists(RunDir.RESULT):
        run_id = run.read_result().mlflow_run_id
    return {
        "manifest_hash": rec.get("data_manifest_hash"),
        "pretrain_run_id": (rec.get("init") or {}).get("pretrain_run_id"),
        "finetune_run_id": run_id,
    }
