"""`evaluate-coatnet`: evaluate a fine-tuned run directory or a registered model on a dataset split.

``model`` is a fine-tuning run directory (raw and EMA weights are both scored) or a registry URI such as
``models:/coatnet-demo@champion``. The dataset is sharded first if it is not in the store yet (cached).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows import summary as summary_md
from flows import tasks
from flows.params import DataSpec, ParameterError, check_data_spec, check_store, dataset_uri
from flows.pretrain import DEMO_FINETUNE_SOURCE, DEMO_STORE
from pipeline.evaluate import is_registry_uri


@flow(name="evaluate-coatnet", log_prints=True, validate_parameters=True)
def evaluate_coatnet(
    model: str,
    store: str = DEMO_STORE,
    data: DataSpec = DataSpec(source=DEMO_FINETUNE_SOURCE),
    split: str = "val",
    max_samples: int | None = None,
    mlflow_tracking_uri: str | None = None,
) -> dict[str, Any]:
    tracking = tasks.tracking_uri(mlflow_tracking_uri)
    if not (is_registry_uri(model) or Path(model).is_dir()):
        raise ParameterError(f"model {model!r} is neither a run directory nor a models:/NAME@ALIAS URI")
    check_store(store)
    check_data_spec(data)
    ds = tasks.shard(data, dataset_uri(store, data.source))
    report = tasks.evaluate(model, ds, split=split, tracking_uri=tracking, max_samples=max_samples)
    result = {"run_name": f"evaluate {model}", "datasets": [ds], "evaluation": tasks.evaluation_summary(report),
              "mlflow_tracking_uri": tracking}
    create_markdown_artifact(markdown=summary_md.render(result), key=summary_md.artifact_key(f"eval-{model}"),
                             description=f"evaluate-coatnet of {model} on {data.source}/{split}")
    return result
