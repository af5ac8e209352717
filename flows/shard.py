"""`shard-dataset`: shard one dataset into MDS shards in the object store, on its own (a partial run).

The same task as the first stage of ``pretrain-coatnet``: skipped when verified shards with the same
manifest hash are already there.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows import summary as summary_md
from flows import tasks
from flows.params import DataSpec, check_data_spec, check_store, dataset_uri


@flow(name="shard-dataset", log_prints=True, validate_parameters=True)
def shard_dataset_flow(
    store: str = "demo-output/store",
    data: DataSpec = DataSpec(source="digits21k"),
    out: str | None = None,
) -> dict[str, Any]:
    """Shard ``data.source`` into ``out`` (default ``{store}/datasets/{source name}``)."""
    check_store(store)
    check_data_spec(data)
    info = tasks.shard(data, out or dataset_uri(store, data.source))
    create_markdown_artifact(
        markdown=summary_md.render({"run_name": f"shard {data.source}", "datasets": [info]}),
        key=summary_md.artifact_key(f"shard-{data.source}"),
        description=f"shards of {data.source}",
    )
    return info
