"""Invalid parameters fail the flow run before any task runs, with a message naming the problem."""

from __future__ import annotations

import pytest

from flows.params import TrainingTarget
from flows.pretrain import pretrain_coatnet
from pipeline import storage
from pipeline.cli import build_parser
from pipeline.launch_options import LaunchOptions, RayOptions, RayTrainOptions, from_arguments


def _task_runs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return run_coro_as_sync(read())


CASES = {
    "unknown override key": (
        dict(pretrain_overrides=["train.epochz=1"]), "unknown key 'train.epochz'"),
    "wrong override type": (
        dict(finetune_overrides=["optim.lr=fast"]), "optim.lr"),
    "missing config file": (
        dict(pretrain_config="configs/pretrain/no-such-recipe.yaml"), "config file not found"),
    "unknown shard option": (
        dict(pretrain_data={"source": "digits21k", "options": {"max_sidee": 64}}), "max_sidee"),
    "cluster mode without address": (
        dict(training={"mode": "ray-job"}), "ray_address"),
    "unknown training mode": (
        dict(training={"mode": "kubernetes"}), "mode"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_invalid_parameters_fail_before_any_task(case, prefect_harness, tmp_path, flow_tracking_uri):
    params, message = CASES[case]
    store = str(tmp_path / "store")
    state = pretrain_coatnet(
        store=store, run_name="bad", work_dir=str(tmp_path / "runs"), mlflow_tracking_uri=flow_tracking_uri,
        **params, return_state=True,
    )
    assert state.is_failed(), state
    assert message in str(state.message) + repr(_exception(state)), (state.message, _exception(state))
    flow_run_id = state.state_details.flow_run_id
    if flow_run_id is not None:  # parameter type errors are rejected before a flow run is even created
        assert _task_runs(flow_run_id) == []
    # nothing was written: no shards, no run directory
    assert not any(o for o in storage.list_objects(store) if "/datasets/" in o.uri or "/runs/" in o.uri)
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(300)
def test_unwritable_store_fails_before_any_task(prefect_harness, s3_endpoint, tmp_path, flow_tracking_uri):
    state = pretrain_coatnet(
        store="s3://no-such-bucket-for-flows/x", run_name="bad", work_dir=str(tmp_path / "runs"),
        mlflow_tracking_uri=flow_tracking_uri, return_state=True,
    )
    assert state.is_failed()
    assert "cannot write to s3://no-such-bucket-for-flows/x" in repr(_exception(state))
    assert _task_runs(state.state_details.flow_run_id) == []


def _exception(state):
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - the flow's failure is what we inspect
        return e
    return None


def test_launch_options_are_defined_once():
    """The CLI flags, the flows' `training` parameter and Ray Train's options come from one definition."""
    def parse(*flags: str):
        return build_parser().parse_args(["pretrain", "--config", "x.yaml", *flags])

    args = parse()
    assert from_arguments(args) == LaunchOptions() and (args.launcher, args.nproc, args.ray_address) == ("local", 1, None)
    assert (TrainingTarget().launcher, TrainingTarget().nproc) == ("deepspeed", 2)  # the flows' own defaults
    assert set(LaunchOptions.model_fields) <= set(TrainingTarget.model_fields)
    assert set(RayTrainOptions.model_fields) <= set(RayOptions.model_fields)
    # The cluster job's command line gives the CLI exactly the flow's launch options.
    t = TrainingTarget(mode="ray-job", ray_address="http://head:8265", launcher="ray", nproc=4, num_workers=8,
                       gpus_per_worker=1, max_failures=5)
    args = parse(*t.to_argv())
    assert from_arguments(args) == LaunchOptions(**t.model_dump(include=set(LaunchOptions.model_fields)))
    assert args.ray_address is None  # the jobs address is not the cluster the ranks join
    ray = t.ray_options()
    assert (ray.num_workers, ray.gpus_per_worker, ray.max_failures, ray.address, t.world_size) == (8, 1.0, 5, None, 8)
    for bad in (["--nproc", "0"], ["--gpus-per-worker", "-1"], ["--launcher", "slurm"]):
        with pytest.raises(SystemExit):
            parse(*bad)
