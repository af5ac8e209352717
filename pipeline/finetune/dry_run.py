"""A fine-tuning run worked out without training: the trainer's dry run of the recipe, and the initial
weights prepared (or reused) when the pretrained run and both label spaces can be read, which checks the
head mapping and the strict fit before any compute. What cannot be read from here (the pretraining has not
run yet, no credentials) is a warning, not an error.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from pipeline import storage
from pipeline.artifacts import MANIFEST, RunDir
from pipeline.finetune.config import FinetuneConfig, load_finetune_config
from pipeline.finetune.consolidate import CheckpointNotFound, resolve_checkpoint
from pipeline.finetune.finetune import TIMM_PREFIX, PreparedInit, prepare_init_weights
from pipeline.train.config import ConfigError, dataset_manifest, dataset_root
from pipeline.train.dry_run import DryRun, dry_run


@dataclass(frozen=True)
class FinetuneDryRun:
    config: FinetuneConfig
    init: PreparedInit | None  # None when the pretrained run or a label space could not be read
    train: DryRun  # warnings include the fine-tuning ones


def finetune_dry_run(config: FinetuneConfig | str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
                     world_size: int) -> FinetuneDryRun:
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config, list(overrides),
                                                                                check_data=False)
    ft = cfg.finetune
    unreadable = [w for w in (_pretrained_problem(ft.pretrained), _classes_problem(cfg)) if w]
    init = None
    if unreadable:
        unreadable.append("initial weights not prepared: consolidation, head mapping and the strict fit are "
                          "checked once these can be read")
    else:
        init = prepare_init_weights(cfg)
    train_cfg = cfg.train if init is None else cfg.train.replace(
        model=dataclasses.replace(cfg.train.model, init_weights=str(init.path)))
    remote = {"finetune.pretrained": ft.pretrained, "finetune.source_classes": ft.source_classes}
    dry = dry_run(train_cfg, world_size=world_size, more_uris=remote)
    return FinetuneDryRun(cfg, init, dataclasses.replace(dry, warnings=(*dry.warnings, *unreadable)))


def _pretrained_problem(pretrained: str) -> str | None:
    try:
        if pretrained.endswith(".safetensors"):
            found = storage.exists(pretrained)
        else:
            try:
                resolve_checkpoint(pretrained)
                found = True
            except CheckpointNotFound:
                found = RunDir(pretrained).exists(RunDir.WEIGHTS)
    except Exception as e:  # noqa: BLE001 - bucket, credentials, endpoint: reported, the dry run goes on
        return f"finetune.pretrained: cannot read {pretrained} ({type(e).__name__}: {e})"
    return None if found else (f"finetune.pretrained: no checkpoint or {RunDir.WEIGHTS} at {pretrained} yet "
                               "(run its pretraining first)")


def _classes_problem(cfg: FinetuneConfig) -> str | None:
    """The fine-tuning dataset's and the pretraining label space's manifests must be readable to map the head."""
    src = cfg.finetune.source_classes
    try:
        dataset_manifest(cfg.train)
    except ConfigError:
        return "fine-tuning classes not checked: the data.root manifest cannot be read (see above)"
    if not src or src.startswith(TIMM_PREFIX):
        return None
    try:
        storage.read_text(storage.join(dataset_root(src), MANIFEST))
    except Exception as e:  # noqa: BLE001 - bucket, credentials, endpoint: reported, the dry run goes on
        return f"finetune.source_classes: cannot read the manifest of {src} ({str(e).removeprefix('data.root: ')})"
    return None
