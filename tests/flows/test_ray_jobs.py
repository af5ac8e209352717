"""The cluster mode's Ray Jobs client against a real local Ray (head with its jobs API): a job's log lines
are streamed as they come, success returns, failure raises with the log tail, and a job still running for
the same run and stage is re-attached instead of submitted twice."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import pytest
from flow_helpers import REPO, TINY_FINETUNE, TINY_PRETRAIN, free_port

from flows.pretrain import pretrain_coatnet
from flows.ray_jobs import RayJobError, RayJobSpec, run_ray_job


@pytest.fixture(scope="module")
def ray_jobs_address(s3_endpoint):
    """A local Ray head with its jobs API. Started after the S3 server, so that its workers (which inherit
    this environment) reach the same store when the flow shards on this cluster."""
    import ray

    port = free_port()
    # 4 logical CPUs: a job driver, the Ray Train controller and its 2 workers fit at once.
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             object_store_memory=200 * 2**20, log_to_driver=False)
    address = f"http://127.0.0.1:{port}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:  # the jobs API, then its agent, come up a little after ray.init returns
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    try:
        yield address
    finally:
        ray.shutdown()


def _spec(address: str, code: str, **kw) -> RayJobSpec:
    # working_dir=None: the jobs run on this machine, with this checkout on the path already.
    return RayJobSpec(address=address, entrypoint=[sys.executable, "-c", code], working_dir=None,
                      env_vars={"PYTHONPATH": str(REPO)}, **kw)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_job_logs_stream_and_success(ray_jobs_address):
    # A logger adapter, as Prefect's run logger is.
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("test-ray-jobs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    code = "import time\nfor i in range(3):\n    print(f'step {i}', flush=True); time.sleep(0.5)"
    out = run_ray_job(_spec(ray_jobs_address, code), log=logging.LoggerAdapter(logger, {}))
    assert out.status == "SUCCEEDED" and not out.attached
    assert [s for s in lines if s.endswith(("step 0", "step 1", "step 2"))], lines


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failed_job_raises_with_its_log(ray_jobs_address):
    code = "print('about to fail', flush=True); raise SystemExit('boom: bad recipe')"
    with pytest.raises(RayJobError, match="FAILED") as err:
        run_ray_job(_spec(ray_jobs_address, code), log=lambda s: None)
    assert "boom: bad recipe" in str(err.value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_running_job_of_the_same_stage_is_reattached(ray_jobs_address):
    from ray.job_submission import JobSubmissionClient

    meta = {"coatnet_run": "r1", "coatnet_stage": "pretrain"}
    code = "import time\nfor i in range(8):\n    print(f'tick {i}', flush=True); time.sleep(0.5)"
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(out=run_ray_job(_spec(ray_jobs_address, code, metadata=meta),
                                                                    log=lambda s: None)))
    t.start()
    client = JobSubmissionClient(ray_jobs_address)
    deadline = time.monotonic() + 60
    while not any(j.metadata == meta and str(j.status.value) == "RUNNING" for j in client.list_jobs()):
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.2)
    second = run_ray_job(_spec(ray_jobs_address, "raise SystemExit('must not run')", metadata=meta),
                         log=lambda s: None)
    t.join(120)
    assert second.attached and second.job_id == first["out"].job_id
    assert sum(1 for j in client.list_jobs() if j.metadata == meta) == 1


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not os.environ.get("COATNET_TEST_CLUSTER_FLOW"),
                    reason="cluster-mode flow run (several minutes); set COATNET_TEST_CLUSTER_FLOW=1")
def test_flow_in_cluster_mode(ray_jobs_address, prefect_harness, flow_store, flow_tracking_uri, tmp_path):
    """pretrain-coatnet with training submitted as Ray jobs (Ray Train inside) to a local cluster: the jobs
    read the shards from S3, leave their outputs there, and the flow evaluates and registers them here."""
    creds = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    # The cluster is this machine: the checkout is reached through PYTHONPATH and absolute recipe paths
    # rather than uploaded as the job's working_dir (as a remote cluster would need).
    result = pretrain_coatnet(
        store=flow_store, work_dir=str(tmp_path / "runs"), run_name="cluster", mlflow_tracking_uri=flow_tracking_uri,
        pretrain_config=str(REPO / "configs/pretrain/demo.yaml"), finetune_config=str(REPO / "configs/finetune/demo.yaml"),
        pretrain_overrides=TINY_PRETRAIN, finetune_overrides=TINY_FINETUNE,
        training={"mode": "ray-job", "ray_address": ray_jobs_address, "launcher": "ray", "nproc": 2,
                  "python": sys.executable, "working_dir": None,
                  "env_vars": {**creds, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}},
    )
    for stage in ("pretrain", "finetune"):
        assert result[stage]["ray_job_id"] and result[stage]["finished"], result[stage]
        assert result[stage]["output_dir"].startswith(str(tmp_path))  # outputs brought back from the store
    assert result["registered"]["version"] and "candidate" in result["registered"]["aliases"]
