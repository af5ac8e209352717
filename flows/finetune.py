"""`finetune-coatnet`: fine-tune a pretraining run, evaluate and register it, on its own (a partial run).

The same tasks as the second half of ``pretrain-coatnet``. ``run_name`` names the run whose pretraining
checkpoints are used (``{work_dir}/{run_name}/pretrain``) unless ``pretrained`` points elsewhere (a run
directory, a checkpoints directory or URI, or a ``.safetensors`` file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows import summary as summary_md
from flows import tasks
from flows.params import (
    DataSpec,
    ParameterError,
    TrainingTarget,
    check_data_spec,
    check_store,
    check_target,
    dataset_uri,
    local_run_dir,
)
from flows.pretrain import (
    DEMO_FINETUNE_CONFIG,
    DEMO_FINETUNE_SOURCE,
    DEMO_MODEL_NAME,
    DEMO_PRETRAIN_SOURCE,
    DEMO_STORE,
    DEMO_WORK_DIR,
    plan_finetune,
)
from pipeline import storage


@flow(name="finetune-coatnet", log_prints=True, validate_parameters=True)
def finetune_coatnet(
    run_name: str,
    store: str = DEMO_STORE,
    pretrained: str | None = None,
    pretrain_data: DataSpec = DataSpec(source=DEMO_PRETRAIN_SOURCE),
    finetune_data: DataSpec = DataSpec(source=DEMO_FINETUNE_SOURCE),
    finetune_config: str = DEMO_FINETUNE_CONFIG,
    finetune_overrides: list[str] | None = None,
    training: TrainingTarget = TrainingTarget(),
    model_name: str = DEMO_MODEL_NAME,
    eval_split: str = "val",
    work_dir: str = DEMO_WORK_DIR,
    mlflow_tracking_uri: str | None = None,
) -> dict[str, Any]:
    tracking = tasks.tracking_uri(mlflow_tracking_uri)
    check_store(store)
    check_target(training, store)
    check_data_spec(pretrain_data)
    check_data_spec(finetune_data)
    pretrained = pretrained or local_run_dir(work_dir, run_name, "pretrain")
    if not (Path(pretrained).exists() or storage.exists(pretrained)):
        raise ParameterError(f"pretrained {pretrained!r} does not exist: give the pretraining run_name, or a run "
                             "directory, checkpoints directory/URI or .safetensors file as `pretrained`")
    plan = plan_finetune(finetune_config, finetune_overrides or [], store=store, work_dir=work_dir,
                         run_name=run_name, tracking_uri=tracking, finetune_data=finetune_data,
                         pretrain_data=pretrain_data, pretrained=pretrained)

    pre_ds = tasks.shard(pretrain_data, dataset_uri(store, pretrain_data.source))  # its class map; cached
    ft_ds = tasks.shard(finetune_data, dataset_uri(store, finetune_data.source))
    ft = tasks.finetune(plan, training, run_name, store, ft_ds, pre_ds, None)
    report = tasks.evaluate(ft["output_dir"], ft_ds, split=eval_split, tracking_uri=tracking,
                            mlflow_run_id=ft.get("mlflow_run_id"))
    reg = tasks.register(ft["output_dir"], report, model_name=model_name, tracking_uri=tracking,
                         lineage={"finetune_run_id": ft.get("mlflow_run_id")})
    result = {"run_name": run_name, "store": store, "datasets": [ft_ds], "finetune": ft,
              "evaluation": tasks.evaluation_summary(report), "registered": reg, "mlflow_tracking_uri": tracking}
    create_markdown_artifact(markdown=summary_md.render(result), key=summary_md.artifact_key(f"{run_name}-finetune"),
                             description=f"finetune-coatnet run {run_name}")
    return result
