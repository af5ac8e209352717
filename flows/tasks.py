"""The Prefect tasks of the CoAtNet flows: each one calls the same pipeline function as the CLI.

Retry policy: I/O stages (sharding to the object store, registering in MLflow) retry with exponential
back-off and jitter, because their failures are mostly transient (network, throttling) and they are
idempotent (sharding skips work already done; registering creates a new version). Training stages never
retry blindly: a crash there is as likely a bug or an out-of-memory as a flake, and a blind retry would
repeat it at full cost. Instead they always start with ``resume="auto"`` into a run directory that is
derived from the run name, so a retried or re-run flow run continues from the newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from flows.params import DataSpec, StagePlan, TrainingTarget, run_uri
from flows.ray_jobs import RayJobSpec, run_ray_job
from pipeline import storage
from pipeline.artifacts import Manifest, RunDir, TrainResult
from pipeline.data import ShardError, SourceError, shard_dataset, verify_shards
from pipeline.evaluate import evaluate as evaluate_model
from pipeline.finetune import run as finetune_run
from pipeline.registry import register as register_model
from pipeline.storage import StorageError
from pipeline.tracking import resolve_tracking_uri
from pipeline.train import launch
from pipeline.train.checkpoint import CheckpointManager

IO_RETRIES = int(os.environ.get("COATNET_FLOW_IO_RETRIES", "3"))
IO_BACKOFF_S = float(os.environ.get("COATNET_FLOW_IO_BACKOFF_S", "10"))


def as_dict(obj: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a pipeline result (dataclass, namedtuple or mapping)."""
    if isinstance(obj, TrainResult):  # its unknown keys are kept beside the fields
        obj = obj.to_dict()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif hasattr(obj, "_asdict"):
        obj = obj._asdict()
    elif not isinstance(obj, Mapping):
        obj = dict(vars(obj))
    return {str(k): _jsonable(v) for k, v in obj.items()}


def _jsonable(v: Any) -> Any:
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set):
        return [_jsonable(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return as_dict(v)
    if hasattr(v, "item"):  # numpy / torch scalars
        try:
            return v.item()
        except Exception:  # noqa: BLE001
            pass
    return str(v)


def transient(task, task_run, state) -> bool:
    """Retry only failures that a retry can fix: a wrong source, bad options or corrupt shards fail at once."""
    try:
        state.result()
    except (SourceError, ShardError, StorageError, ValueError, TypeError, CachedShardsInvalid):
        return False
    except Exception:  # noqa: BLE001 - network, throttling, a lost Ray worker: worth another try
        return True
    return True


# How every I/O task retries: exponential back-off with jitter, and only failures a retry can fix.
IO_RETRY: dict[str, Any] = {
    "retries": IO_RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=IO_BACKOFF_S),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": transient,
}


# --------------------------------------------------------------------------------------------- sharding
class CachedShardsInvalid(RuntimeError):
    """Shards of the same config exist but do not match their manifest; nothing is deleted automatically."""


@task(
    name="shard-dataset",
    **IO_RETRY,
    task_run_name="shard {spec.source}",
)
def shard(spec: DataSpec, out: str) -> dict[str, Any]:
    """Shard ``spec.source`` under ``out``. ``shard_dataset`` skips the work when shards of the same
    config hash are there; the flow then verifies them against their manifest before trusting them."""
    logger = get_run_logger()
    result = shard_dataset(spec.source, out, **spec.options)
    verified = None
    if result.skipped and spec.verify_cached:
        report = verify_shards(result.uri)
        if not report.ok:
            errors = "; ".join(report.errors[:5])
            raise CachedShardsInvalid(
                f"cached shards at {result.uri} do not match their manifest ({len(report.errors)} problems: "
                f"{errors}); delete {result.uri} to shard again"
            )
        verified = True
    info = dataset_info(result.uri, result.manifest, skipped=bool(result.skipped), source=spec.source)
    info["verified"] = verified
    logger.info(
        "%s %s: %s classes, %s",
        "reused verified shards at" if info["skipped"] else "wrote shards to",
        info["uri"], info["num_classes"], ", ".join(f"{k}={v}" for k, v in info["samples"].items()),
    )
    return info


def dataset_info(uri: str, manifest: Mapping[str, Any], *, skipped: bool, source: str | None = None) -> dict:
    m = Manifest.model_validate(manifest)
    return {
        "source": source or m.source,
        "uri": uri,
        "num_classes": m.num_classes,
        "samples": {k: v.samples for k, v in m.splits.items()},
        "manifest_hash": m.manifest_hash,
        "config_hash": m.config_hash,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------------------------- training
def resume_point(plan: StagePlan) -> int | None:
    """The step training will resume from (the newest complete checkpoint, local then the store's copy,
    as ``resume="auto"`` chooses), or None for a fresh start; read before launching for the run summary."""
    ckpt = plan.train_config.checkpoint
    return CheckpointManager(plan.checkpoint_dir, keep_last=ckpt.keep_last, upload_uri=ckpt.upload_uri, rank=0,
                             local_rank=0).resume_step()


def train_summary(result: Mapping[str, Any], resumed_from: int | None, mode: str) -> dict[str, Any]:
    out = dict(result)
    out["metrics"] = {"steps": result.get("step"), **(result.get("final_metrics") or {})}
    out["resumed_from_step"] = resumed_from
    out["mode"] = mode
    return out


def _launch_local(plan: StagePlan, target: TrainingTarget) -> dict[str, Any]:
    if plan.stage == "finetune":
        ft = finetune_run(plan.config_path, list(plan.overrides), resume="auto", **target.launch_kwargs())
        return {**as_dict(ft.train), "init_weights": str(ft.init.path), "head_init": _jsonable(ft.init.head)}
    return as_dict(launch(plan.config_path, list(plan.overrides), resume="auto", **target.launch_kwargs()))


# Endpoints the job needs to reach the same object store and tracking server. Credentials are deliberately
# not forwarded: a job's runtime_env is readable on the Ray dashboard; cluster nodes bring their own (IAM role).
JOB_ENV = ("S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "AWS_DEFAULT_REGION")


def cli_command(plan: StagePlan, target: TrainingTarget, outputs_uri: str) -> list[str]:
    """The command the cluster job runs: the `coatnet` CLI a user would type for this stage, wrapped so what
    it leaves in its run directory on the cluster is copied to the object store for the flow."""
    cli = [plan.stage, "--config", plan.config_path, "--resume", "auto", *target.to_argv(), *plan.overrides,
           "logging.progress_bar=false"]
    return [target.python, "-m", "flows.ray_entry", "--outputs-uri", outputs_uri, "--", *cli]


def _launch_ray_job(plan: StagePlan, target: TrainingTarget, run_name: str, store: str) -> dict[str, Any]:
    outputs_uri = storage.join(run_uri(store, run_name, plan.stage), "outputs")
    forwarded = {k: os.environ[k] for k in JOB_ENV if k in os.environ}
    spec = RayJobSpec(
        address=str(target.ray_address),
        entrypoint=cli_command(plan, target, outputs_uri),
        metadata={"coatnet_run": run_name, "coatnet_stage": plan.stage},
        working_dir=target.working_dir,
        env_vars={**forwarded, **target.env_vars},
        entrypoint_num_cpus=target.entrypoint_num_cpus,
        entrypoint_num_gpus=target.entrypoint_num_gpus,
    )
    outcome = run_ray_job(spec, log=get_run_logger(), timeout_s=target.timeout_s)
    # The run's exported files, here, where evaluation and registration read them.
    storage.download_dir(outputs_uri, plan.output_dir)
    result = RunDir(plan.output_dir).read_result().to_dict()
    remote_dir = result["output_dir"]
    local = {k: v.replace(remote_dir, plan.output_dir, 1) if isinstance(v, str) and v.startswith(remote_dir) else v
             for k, v in result.items()}
    return {**local, "cluster_output_dir": remote_dir, "ray_job_id": outcome.job_id}


def run_training(plan: StagePlan, target: TrainingTarget, run_name: str, store: str) -> dict[str, Any]:
    """Launch a training stage with ``resume="auto"`` and return its result with the step it resumed from."""
    logger = get_run_logger()
    resumed_from = resume_point(plan)
    logger.info("%s: %s into %s", plan.stage,
                f"resuming from step {resumed_from}" if resumed_from is not None else "starting from step 0",
                plan.output_dir)
    if target.mode == "ray-job":
        result = _launch_ray_job(plan, target, run_name, store)
    else:
        result = _launch_local(plan, target)
    if not result.get("finished", True):
        raise RuntimeError(f"{plan.stage} stopped at step {result.get('step')} of {result.get('total_steps')}")
    summary = train_summary(result, resumed_from, target.mode)
    if target.mode == "ray-job" and plan.train_config.checkpoint.upload_uri:
        summary["checkpoint_uri"] = plan.train_config.checkpoint.upload_uri  # what other cluster nodes can read
    logger.info("%s finished: step %s/%s, %s", plan.stage, result.get("step"), result.get("total_steps"),
                ", ".join(f"{k}={v:.4g}" for k, v in (result.get("final_metrics") or {}).items()
                          if isinstance(v, float)))
    return summary


# Training never retries blindly (retries=0): see the module docstring.
@task(name="pretrain", retries=0, task_run_name="pretrain ({target.mode})")
def pretrain(plan: StagePlan, target: TrainingTarget, run_name: str, store: str, dataset: dict) -> dict[str, Any]:
    """Pretrain on the shards ``dataset`` names (the exact config root the shard task returned)."""
    return run_training(plan.with_overrides(f"data.root={dataset['uri']}"), target, run_name, store)


@task(name="finetune", retries=0, task_run_name="finetune ({target.mode})")
def finetune(plan: StagePlan, target: TrainingTarget, run_name: str, store: str, dataset: dict,
             pretrain_dataset: dict, pretrained: dict | None) -> dict[str, Any]:
    """Fine-tune from the pretraining run (its newest checkpoint is consolidated, the head mapped through
    the pretraining dataset's class map) on the fine-tuning shards."""
    extra = [f"data.root={dataset['uri']}", f"finetune.source_classes={pretrain_dataset['uri']}"]
    if pretrained is not None:
        # A remote copy of the checkpoints is what a cluster node can read; the local run directory otherwise.
        extra.append(f"finetune.pretrained={pretrained.get('checkpoint_uri') or pretrained['output_dir']}")
    return run_training(plan.with_overrides(*extra), target, run_name, store)


# --------------------------------------------------------------------------------------------- evaluate
@task(name="evaluate", retries=0, task_run_name="evaluate {split}")
def evaluate(model_dir: str, dataset: dict, *, split: str = "val", tracking_uri: str | None = None,
             mlflow_run_id: str | None = None, max_samples: int | None = None) -> dict[str, Any]:
    """Top-1/top-5, loss, calibration of the raw and EMA weights of a fine-tuned run on a held-out split."""
    report = evaluate_model(model_dir, dataset["uri"], split=split, tracking_uri=tracking_uri,
                            mlflow_run_id=mlflow_run_id, max_samples=max_samples, progress=False,
                            num_workers=0)
    best = report["weights"][report["best"]]
    get_run_logger().info("evaluation on %s: best weights %s, top-1 %.4f, top-5 %.4f", split, report["best"],
                          best["top1"], best.get("top5", float("nan")))
    return _jsonable(report)


def evaluation_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    best = report["weights"][report["best"]]
    out = {"weights": report["best"], "split": report.get("split"), "samples": best.get("num_samples"),
           "top1": best["top1"], "top5": best.get("top5"), "loss": best.get("loss"), "ece": best.get("ece")}
    for name, w in report["weights"].items():
        out[f"{name} top1"] = w["top1"]
    out["report"] = str(Path(report.get("out_dir", ""), RunDir.EVALUATION))
    return {k: v for k, v in out.items() if v is not None}


# --------------------------------------------------------------------------------------------- register
@task(
    name="register",
    **IO_RETRY,
    task_run_name="register {model_name}",
)
def register(model_dir: str, evaluation: dict, *, model_name: str, tracking_uri: str | None,
             lineage: dict | None = None) -> dict[str, Any]:
    """Register the best-scoring weights in MLflow: every version gets ``candidate``; ``champion`` moves to
    it when its top-1 beats the current champion's."""
    reg = register_model(model_dir, evaluation, name=model_name, tracking_uri=tracking_uri, lineage=lineage)
    get_run_logger().info("registered %s version %s (aliases: %s)", reg.name, reg.version, ", ".join(reg.aliases))
    return as_dict(reg)


def tracking_uri(uri: str | None) -> str:
    """The MLflow store every stage of a run uses: explicit, else MLFLOW_TRACKING_URI, else ./mlflow.db."""
    resolved = resolve_tracking_uri(uri)
    if resolved.startswith("sqlite:///") and not resolved.startswith("sqlite:////"):
        # Relative SQLite paths are made absolute so training ranks and evaluation write to the same file.
        resolved = "sqlite:///" + str(Path(resolved[len("sqlite:///"):]).resolve())
    return resolved
