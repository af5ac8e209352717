"""`pretrain-coatnet`: shard, pretrain, fine-tune, evaluate and register, as one observable Prefect flow.

Run it with `prefect deployment run pretrain-coatnet/local` (see prefect.yaml and the README), or call
``pretrain_coatnet(...)`` directly (``make demo`` does, on Prefect's ephemeral API). The defaults are the
demo: the bundled digits data in its 21K-to-1K shape, 2 DeepSpeed ranks on CPU, a local store directory.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import summary as summary_md
from flows import tasks
from flows.params import (
    DataSpec,
    StagePlan,
    TrainingTarget,
    check_data_spec,
    check_store,
    check_target,
    dataset_uri,
    default_run_name,
    local_run_dir,
    plan_stage,
)

DEMO_STORE = "demo-output/store"
DEMO_WORK_DIR = "demo-output/runs"
DEMO_PRETRAIN_CONFIG = "configs/pretrain/demo.yaml"
DEMO_FINETUNE_CONFIG = "configs/finetune/demo.yaml"
DEMO_PRETRAIN_SOURCE = "digits21k"
DEMO_FINETUNE_SOURCE = "digits"
DEMO_MODEL_NAME = "coatnet-demo"


def plan_finetune(finetune_config: str, overrides: list[str], *, store: str, work_dir: str, run_name: str,
                  tracking_uri: str, finetune_data: DataSpec, pretrain_data: DataSpec,
                  pretrained: str) -> StagePlan:
    """The fine-tuning stage, validated up front with the locations this run will give it."""
    return plan_stage(
        "finetune", finetune_config, overrides, data_root=dataset_uri(store, finetune_data.source),
        output_dir=local_run_dir(work_dir, run_name, "finetune"), store=store, run_name=run_name,
        tracking_uri=tracking_uri,
        extra=[f"finetune.pretrained={pretrained}",
               f"finetune.source_classes={dataset_uri(store, pretrain_data.source)}"],
    )


@flow(name="pretrain-coatnet", log_prints=True, validate_parameters=True)
def pretrain_coatnet(
    store: str = DEMO_STORE,
    pretrain_data: DataSpec = DataSpec(source=DEMO_PRETRAIN_SOURCE),
    finetune_data: DataSpec = DataSpec(source=DEMO_FINETUNE_SOURCE),
    pretrain_config: str = DEMO_PRETRAIN_CONFIG,
    pretrain_overrides: list[str] | None = None,
    finetune_config: str = DEMO_FINETUNE_CONFIG,
    finetune_overrides: list[str] | None = None,
    training: TrainingTarget = TrainingTarget(),
    model_name: str = DEMO_MODEL_NAME,
    eval_split: str = "val",
    run_name: str | None = None,
    work_dir: str = DEMO_WORK_DIR,
    mlflow_tracking_uri: str | None = None,
) -> dict[str, Any]:
    """The whole job.

    ``store``: object store (``s3://bucket/prefix`` or a directory) for shards and checkpoint copies;
    ``work_dir``: where the training ranks write their run directories; ``run_name`` names them, so a
    retried flow run, or a new flow run with the same ``run_name``, resumes training from the newest
    checkpoint there (default: the flow run's name, which Prefect's *Retry* keeps).
    """
    logger = get_run_logger()
    run_name = run_name or default_run_name()
    tracking = tasks.tracking_uri(mlflow_tracking_uri)

    # --- every parameter is checked before the first task runs
    check_store(store)
    check_target(training, store)
    check_data_spec(pretrain_data)
    check_data_spec(finetune_data)
    pre_plan = plan_stage(
        "pretrain", pretrain_config, pretrain_overrides or [], data_root=dataset_uri(store, pretrain_data.source),
        output_dir=local_run_dir(work_dir, run_name, "pretrain"), store=store, run_name=run_name,
        tracking_uri=tracking,
    )
    ft_plan = plan_finetune(finetune_config, finetune_overrides or [], store=store, work_dir=work_dir,
                            run_name=run_name, tracking_uri=tracking, finetune_data=finetune_data,
                            pretrain_data=pretrain_data, pretrained=pre_plan.output_dir)
    logger.info("run %s: store %s, runs in %s, training %s (%s x%d), MLflow %s", run_name, store, work_dir,
                training.mode, training.launcher, training.nproc, tracking)

    # --- the stages
    pre_ds = tasks.shard(pretrain_data, dataset_uri(store, pretrain_data.source))
    ft_ds = tasks.shard(finetune_data, dataset_uri(store, finetune_data.source))
    pre = tasks.pretrain(pre_plan, training, run_name, store, pre_ds)
    ft = tasks.finetune(ft_plan, training, run_name, store, ft_ds, pre_ds, pre)
    report = tasks.evaluate(ft["output_dir"], ft_ds, split=eval_split, tracking_uri=tracking,
                            mlflow_run_id=ft.get("mlflow_run_id"))
    reg = tasks.register(ft["output_dir"], report, model_name=model_name, tracking_uri=tracking,
                         lineage={"pretrain_run_id": pre.get("mlflow_run_id"),
                                  "finetune_run_id": ft.get("mlflow_run_id")})

    result = {
        "run_name": run_name,
        "store": store,
        "datasets": [pre_ds, ft_ds],
        "pretrain": pre,
        "finetune": ft,
        "evaluation": tasks.evaluation_summary(report),
        "registered": reg,
        "mlflow_tracking_uri": tracking,
    }
    create_markdown_artifact(
        markdown=summary_md.render(result),
        key=summary_md.artifact_key(run_name),
        description=f"pretrain-coatnet run {run_name}: data, training, evaluation, registered model",
    )
    return result
