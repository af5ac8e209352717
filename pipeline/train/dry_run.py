"""A training run worked out without running it: the plan for a world size, the memory a rank would need,
and, as warnings, what could not be checked from here (shards not readable yet, no credentials).

This is how a run is sized before its data exists or before credentials are set up
(``coatnet pretrain --dry-run``). The step counts come from the shards' own index when it can be read,
else from ``data.num_samples``: a count, or a dataset of ``pipeline.train.known_datasets`` with its
published size. Only an invalid recipe is an error; anything unreadable is a warning.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline import models, storage
from pipeline.artifacts import Manifest
from pipeline.cluster import sizing
from pipeline.data.config import DEFAULT_MINIVAL_FRACTION
from pipeline.train.config import (
    ConfigError,
    Plan,
    TrainConfig,
    dataset_manifest,
    load_config,
    make_plan,
    split_samples,
)
from pipeline.train.known_datasets import KNOWN_DATASETS


@dataclass(frozen=True)
class DryRun:
    config: TrainConfig
    plan: Plan
    samples_from: str  # where plan.train_samples comes from
    classes_from: str  # where plan.num_classes comes from
    memory_gib_per_rank: float | None  # pipeline.cluster.sizing's estimate; None when it has no model
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("config")
        return {**d, "plan": self.plan.to_dict(), "config_hash": self.config.config_hash}


def dry_run(config: TrainConfig | str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
            world_size: int, more_uris: dict[str, str] | None = None) -> DryRun:
    """Validate the recipe and size it for ``world_size`` ranks; raises ConfigError only for an invalid recipe
    (or one whose size cannot be known: unreadable shards and no ``data.num_samples``)."""
    cfg = config if isinstance(config, TrainConfig) else load_config(Path(config), list(overrides),
                                                                      check_data=False)
    warnings = credential_warnings({"data.root": cfg.data.root, "model.init_weights": cfg.model.init_weights,
                                    "checkpoint.upload_uri": cfg.checkpoint.upload_uri, **(more_uris or {})})
    samples, samples_from, manifest = _train_samples(cfg, warnings)
    classes, classes_from = _num_classes(cfg, manifest)
    plan = make_plan(cfg, world_size, train_samples=samples, num_classes=classes)
    memory = None
    m = cfg.model
    try:
        # A model without a layout in sizing is sized by a meta-device forward.
        elements = None if m.name in sizing.LAYOUTS else models.activation_elements(
            m.name, num_classes=plan.num_classes, img_size=m.img_size, overrides=m.overrides)
        memory = sizing.memory_gib(m.name, m.img_size, params=plan.params,
                                   zero_stage=cfg.deepspeed.zero_stage, world_size=world_size,
                                   micro_batch=plan.micro_batch_size, checkpointing=m.grad_checkpointing,
                                   activation_elements=elements)
    except (ValueError, KeyError, TypeError) as e:
        warnings.append(f"memory: no estimate for {cfg.model.name} ({e})")
    if memory is not None and (cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_params):
        warnings.append("memory: the estimate keeps every state on the GPU; deepspeed.offload_* moves part "
                        "of it to host memory")
    if world_size == 1 and cfg.deepspeed.zero_stage in (1, 2) and not cfg.deepspeed.offload_optimizer:
        # Profiled (benchmarks/train_overhead.py --profile): on one rank ZeRO-1/2 partition nothing, yet every
        # parameter's gradient hook copies it into a reduce bucket and the buckets are all-reduced over a world
        # of one: about 0.85x the bare step (contiguous_gradients off, engine.zero_layout) against 0.91-0.97x with
        # stage 0, whose one-rank engine skips the all-reduce (coatnet_pico, CPU).
        warnings.append(f"deepspeed: ZeRO-{cfg.deepspeed.zero_stage} on one rank partitions nothing and costs "
                        "gradient-bucket copies each step; deepspeed.zero_stage=0 is faster for a one-rank run "
                        "(its checkpoints resume on other world sizes only through a universal checkpoint)")
    return DryRun(cfg, plan, samples_from, classes_from, memory, tuple(warnings))


def credential_warnings(uris: dict[str, str | None]) -> list[str]:
    """A warning when object-store URIs are in use and boto3 finds no credentials (env, files, role)."""
    remote = {k: v for k, v in uris.items() if v and storage.is_remote(v)}
    if not remote:
        return []
    import boto3  # lazy: only when the recipe reaches an object store

    if boto3.session.Session().get_credentials() is not None:
        return []
    where = ", ".join(f"{k}={v}" for k, v in remote.items())
    return [f"credentials: no AWS credentials found (environment, shared files, instance role) for {where}; "
            "training reads and writes these and would fail"]


def _train_samples(cfg: TrainConfig, warnings: list[str]) -> tuple[int, str, Manifest | None]:
    """(train samples, their source, the manifest when readable)."""
    n = cfg.data.num_samples
    try:
        samples = split_samples(cfg, cfg.data.train_split)
        manifest = dataset_manifest(cfg)
    except ConfigError as e:
        if n is None:
            raise ConfigError(f"{e}. Without the shards a dry run sizes the steps from data.num_samples: set it "
                              f"to the number of train samples or a known dataset ({', '.join(KNOWN_DATASETS)})"
                              ) from e
        fallback = (f"data.num_samples={n}" if isinstance(n, int) else
                    f"the known size of {n} less the {DEFAULT_MINIVAL_FRACTION:.0%} minival")
        warnings.append(f"shards not checked: {e}; steps sized from {fallback}")
        if isinstance(n, int):
            return n, "data.num_samples", None
        known = KNOWN_DATASETS[n]
        return known.train_samples(DEFAULT_MINIVAL_FRACTION), f"{fallback}: {known.source}", None
    try:
        split_samples(cfg, cfg.data.eval_split)
    except ConfigError as e:
        warnings.append(f"eval split not found: {e}")
    if isinstance(n, int) and n != samples:
        warnings.append(f"data.num_samples={n} differs from the {samples} samples of the shards; the shards win")
    return samples, f"the shards' index ({cfg.data.root}, split {cfg.data.train_split})", manifest


def _num_classes(cfg: TrainConfig, manifest: Manifest | None) -> tuple[int, str]:
    if cfg.model.num_classes:
        return cfg.model.num_classes, "model.num_classes"
    if manifest is not None:
        return manifest.num_classes, "the dataset manifest"
    if isinstance(cfg.data.num_samples, str):
        known = KNOWN_DATASETS[cfg.data.num_samples]
        return known.num_classes, f"the known label space of {known.name}"
    raise ConfigError("model.num_classes: the manifest cannot be read and data.num_samples names no known "
                      "dataset; set model.num_classes to size the classifier")
