"""pretrain-coatnet end to end under prefect_test_harness, with the local S3 server as object store.

One flow run is started in a child process and killed (the flow process and every training rank, SIGKILL,
as when a machine is lost) once pretraining has written a complete checkpoint. The same run is then
started again: it must resume pretraining from that checkpoint, not from step 0, and go on to fine-tune,
evaluate, register, and leave its summary artifact.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from flow_helpers import REPO, TINY_FINETUNE, TINY_PRETRAIN

from flows.pretrain import pretrain_coatnet
from pipeline import storage

# Long enough that the kill lands mid-way: checkpoints every 2 steps, 16 steps in all.
KILLABLE_PRETRAIN = [*TINY_PRETRAIN, "train.max_steps=16"]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the flow process and all its descendants (the ranks run in sessions of their own)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in [psutil.Process(proc.pid), *tree] if proc.poll() is None else tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def _read_artifact(key: str):
    from prefect import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    return [a for a in run_coro_as_sync(read()) if a.key == key]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_run_resumes_from_checkpoint_and_completes(prefect_harness, flow_store, flow_tracking_uri, tmp_path):
    work_dir = tmp_path / "runs"
    params = dict(store=flow_store, work_dir=str(work_dir), run_name="e2e", mlflow_tracking_uri=flow_tracking_uri,
                  pretrain_overrides=KILLABLE_PRETRAIN, finetune_overrides=TINY_FINETUNE)
    ckpts = work_dir / "e2e" / "pretrain" / "checkpoints"

    # 1. The run in a child process, against the same Prefect API and S3 server; killed mid-pretraining.
    env = {**os.environ, "PREFECT_API_URL": prefect_harness, "DS_ACCELERATOR": "cpu"}
    code = "import json, sys; from flows.pretrain import pretrain_coatnet; pretrain_coatnet(**json.loads(sys.argv[1]))"
    log_path = tmp_path / "killed-run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 900
            while not (ckpts / "latest").is_file():
                assert proc.poll() is None, f"flow exited {proc.returncode} early:\n{log_path.read_text()[-4000:]}"
                assert time.monotonic() < deadline, f"no checkpoint after 900 s:\n{log_path.read_text()[-4000:]}"
                time.sleep(0.2)
        finally:
            _kill_tree(proc)
    killed_at = int(re.fullmatch(r"step_(\d+)", (ckpts / "latest").read_text().strip()).group(1))
    assert 0 < killed_at < 16, killed_at
    assert not (work_dir / "e2e" / "pretrain" / "result.json").exists()  # it really did not finish

    # 2. The same run again: resumes pretraining from the checkpoint, then runs every other stage.
    result = pretrain_coatnet(**params)

    pre = result["pretrain"]
    assert pre["resumed_from_step"] is not None and pre["resumed_from_step"] >= killed_at
    assert pre["step"] == pre["total_steps"] == 16 and pre["finished"]
    log_text = log_path.read_text()
    assert "pretrain: starting from step 0" in log_text  # the killed run began fresh
    ds = {d["source"]: d for d in result["datasets"]}
    assert ds["digits21k"]["skipped"] and ds["digits21k"]["verified"]  # sharded by the killed run, reused here
    assert ds["digits21k"]["num_classes"] == 40 and ds["digits"]["num_classes"] == 10
    assert storage.exists(storage.join(ds["digits21k"]["uri"], "manifest.json"))
    assert ds["digits21k"]["uri"].startswith(flow_store)

    ft, ev, reg = result["finetune"], result["evaluation"], result["registered"]
    assert ft["finished"] and ft["resumed_from_step"] is None
    assert 0.0 <= ev["top1"] <= ev["top5"] <= 1.0
    assert reg["name"] == "coatnet-demo" and "candidate" in reg["aliases"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=flow_tracking_uri, registry_uri=flow_tracking_uri)
    mv = client.get_model_version_by_alias("coatnet-demo", "candidate")
    assert str(mv.version) == str(reg["version"])

    # The pretraining checkpoints were copied to the object store too.
    assert storage.exists(storage.join(flow_store, "runs", "e2e", "pretrain", "checkpoints", "latest"))

    artifacts = _read_artifact("coatnet-e2e")
    assert artifacts, "no summary artifact"
    md = artifacts[0].data
    assert f"resumed from step | {pre['resumed_from_step']}" in md
    assert "candidate" in md and "top1" in md
    assert Path(pre["output_dir"]).is_dir()
