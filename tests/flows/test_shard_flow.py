"""shard-dataset on the local S3 server: the second run reuses the shards after verifying them; shards
corrupted in the store are caught by that verification, and the run fails without retrying or deleting."""

from __future__ import annotations

import pytest

from flows.shard import shard_dataset_flow
from pipeline import storage


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_shard_cache_is_verified_before_reuse(prefect_harness, flow_store):
    # A source of its own (16-pixel digits), so corrupting it cannot disturb other tests' shards.
    data = {"source": "digits:size=16", "options": {"workers": 1}}
    first = shard_dataset_flow(store=flow_store, data=data)
    assert not first["skipped"] and first["num_classes"] == 10
    assert sum(first["samples"].values()) == 1797  # every bundled digit, in train/minival/val

    second = shard_dataset_flow(store=flow_store, data=data)
    assert second["skipped"] and second["verified"] and second["uri"] == first["uri"]
    assert second["manifest_hash"] == first["manifest_hash"]

    shard = next(o.uri for o in storage.list_objects(first["uri"]) if o.uri.endswith(".mds"))
    storage.write_bytes(shard, storage.read_bytes(shard)[:-16] + b"\0" * 16)  # same size, other bytes
    state = shard_dataset_flow(store=flow_store, data=data, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="do not match their manifest") as err:
        state.result()
    assert "sha256" in str(err.value)
    assert storage.exists(shard)  # nothing deleted behind the user's back
    task_runs = _task_runs(state.state_details.flow_run_id)
    assert len(task_runs) == 1 and task_runs[0].run_count == 1  # a corrupt cache is not retried


def _task_runs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return run_coro_as_sync(read())
