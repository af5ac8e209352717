"""Flow parameters and their validation, done before the first task runs.

Prefect validates the typed parameters (pydantic) before a flow run starts; ``plan_stage`` then loads every
config file with its overrides through the same loader the CLI uses, checks the object store is writable
and the shard options are known, so a typo in an override or a missing bucket fails the flow run in
seconds instead of after sharding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from pipeline import storage
from pipeline.artifacts import RunDir
from pipeline.data import shard_dataset
from pipeline.data.sources import SourceError, parse_source
from pipeline.finetune import load_finetune_config
from pipeline.launch_options import Launcher, LaunchOptions
from pipeline.train.config import load_config


class ParameterError(ValueError):
    """A flow parameter is invalid; raised before any task runs."""


class DataSpec(BaseModel):
    """One dataset to shard: a source spec of ``pipeline.data`` (``digits``, ``digits21k``,
    ``imagenet21k:PATH``, ``imagefolder:PATH``, ...) and keyword options of ``shard_dataset``
    (``max_side``, ``jpeg_quality``, ``workers``, ...). ``verify_cached``: shards found already done are
    checked against their manifest (sizes and SHA-256) before a run trusts them."""

    model_config = ConfigDict(extra="forbid")
    source: str
    options: dict[str, Any] = Field(default_factory=dict)
    verify_cached: bool = True


class TrainingTarget(LaunchOptions):
    """Where the training stages run: the launch options of `coatnet pretrain|finetune` (launcher, nproc, the
    Ray Train workers; ``pipeline.launch_options``) plus where the flow starts them. ``local``: the
    launcher's processes on the host of the flow run. ``ray-job``: the `coatnet` CLI with these options,
    submitted to a Ray cluster through Ray Jobs, logs followed to the end."""

    mode: Literal["local", "ray-job"] = "local"
    launcher: Launcher = "deepspeed"  # the flows' default; the CLI's is "local"
    nproc: PositiveInt = 2
    ray_address: str | None = None  # Ray dashboard/jobs address, e.g. http://head:8265 (mode ray-job)
    python: str = "python"  # interpreter on the cluster that runs the `coatnet` CLI
    working_dir: str | None = "."  # uploaded as the job's working_dir (config files travel with it)
    env_vars: dict[str, str] = Field(default_factory=dict)
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    timeout_s: float | None = None

    @model_validator(mode="after")
    def _address_for_cluster(self) -> TrainingTarget:
        if self.mode == "ray-job" and not self.ray_address:
            raise ValueError("training.mode 'ray-job' needs training.ray_address (the Ray jobs address)")
        return self


@dataclass(frozen=True)
class StagePlan:
    """A training stage resolved up front: config file, the full override list (user overrides first, then
    the locations the flow fixes), where it writes, and the validated config."""

    stage: str
    config_path: str
    overrides: tuple[str, ...]
    output_dir: str
    config: Any  # the validated TrainConfig (FinetuneConfig for fine-tuning)

    @property
    def train_config(self) -> Any:
        return self.config.train if hasattr(self.config, "finetune") else self.config

    @property
    def checkpoint_dir(self) -> str:
        return RunDir(self.output_dir).checkpoints

    def with_overrides(self, *extra: str) -> StagePlan:
        """The same stage with more overrides (e.g. the dataset root once sharding named it), re-validated."""
        overrides = (*self.overrides, *extra)
        return dataclasses.replace(self, overrides=overrides, config=load_stage_config(self.stage, self.config_path, overrides))


def dataset_uri(store: str, source: str) -> str:
    """Where a source's shards live in the store: the same for every run, so the shard cache is shared.

    Named by the source kind plus a hash of its normalised spec (``digits21k-3f2a...``), so two sources of
    the same kind (different folders, sizes, rotations) never share a directory.
    """
    spec = parse_source(source).spec
    kind = spec.partition(":")[0]
    return storage.join(store, "datasets", f"{kind}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}")


def check_source(spec: DataSpec) -> None:
    """The source spec parses and its folder (if any) exists: cheap, no file is opened."""
    try:
        parse_source(spec.source)
    except SourceError as e:
        raise ParameterError(f"data source {spec.source!r}: {e}") from e


def run_uri(store: str, run_name: str, stage: str) -> str:
    """Object-store location of a run's stage (checkpoint copies, evaluation reports)."""
    return storage.join(store, "runs", run_name, stage)


def local_run_dir(work_dir: str, run_name: str, stage: str) -> str:
    """Where the DeepSpeed ranks write (checkpoints are written locally, then copied to the store)."""
    return str(Path(work_dir, run_name, stage))


def plan_stage(
    stage: str,
    config_path: str,
    overrides: list[str] | tuple[str, ...],
    *,
    data_root: str,
    output_dir: str,
    store: str,
    run_name: str,
    tracking_uri: str | None,
    extra: list[str] | tuple[str, ...] = (),
) -> StagePlan:
    """Resolve and validate a training stage before anything runs.

    The locations the flow owns (data root, output directory, the object-store copy of the checkpoints,
    the MLflow store) are appended after the user's overrides, so they always win and a re-run of the same
    run name lands in the same directory, which is what makes ``resume="auto"`` continue it. Shards need
    not exist yet (they are made by the first task), so the data check is left to the training stage.
    """
    fixed = [f"data.root={data_root}", f"output_dir={output_dir}", f"name={run_name}-{stage}", *extra]
    if storage.is_remote(store):
        fixed.append(f"checkpoint.upload_uri={RunDir(run_uri(store, run_name, stage)).checkpoints}")
    if tracking_uri:
        fixed.append(f"logging.mlflow_tracking_uri={tracking_uri}")
    all_overrides = (*overrides, *fixed)
    config = load_stage_config(stage, config_path, all_overrides)
    return StagePlan(stage, config_path, tuple(all_overrides), output_dir, config)


def check_config_file(path: str) -> None:
    if not Path(path).is_file():
        raise ParameterError(f"config file not found: {path} (paths are relative to {Path.cwd()})")


def check_data_spec(spec: DataSpec) -> None:
    """The source parses and every option is a keyword of ``shard_dataset``."""
    check_source(spec)

    params = inspect.signature(shard_dataset).parameters
    fixed = {"source", "out"}
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in spec.options if k in fixed or (k not in params and not accepts_kwargs))
    if unknown:
        known = sorted(k for k in params if k not in fixed)
        raise ParameterError(f"unknown shard option(s) {unknown} for source {spec.source!r}; known: {known}")


def check_target(target: TrainingTarget, store: str) -> None:
    """A cluster job reads the shards and writes its outputs through the object store, never a local path."""
    if target.mode == "ray-job" and not storage.is_remote(store):
        raise ParameterError(f"training.mode ray-job needs store on an object store the cluster reaches "
                             f"(s3://...), not the local path {store!r}")


def check_store(store: str) -> None:
    try:
        storage.check_writable(store)
    except storage.StorageError as e:
        raise ParameterError(str(e)) from e


def load_stage_config(stage: str, config_path: str, overrides: list[str] | tuple[str, ...]) -> Any:
    """Load and validate a recipe exactly as the CLI does (pretraining: ``TrainConfig``; fine-tuning:
    ``FinetuneConfig``); errors name the bad key. Shards need not exist yet: they are the first task's."""
    check_config_file(config_path)
    try:
        if stage == "finetune":
            return load_finetune_config(config_path, list(overrides), check_data=False)
        return load_config(config_path, list(overrides), check_data=False)
    except Exception as e:  # noqa: BLE001 - any loader error is a parameter error of this flow run
        raise ParameterError(f"{stage} recipe {config_path}: {type(e).__name__}: {e}") from e


def default_run_name() -> str:
    """The flow run's name: stable across Prefect retries of the same flow run, so *Retry* resumes."""
    from prefect.runtime import flow_run  # lazy: the rest of flows.params works without importing Prefect

    name = flow_run.name
    if not name:
        raise ParameterError("run_name is required outside a flow run")
    return str(name)
