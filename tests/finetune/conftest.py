"""Fixtures of the fine-tuning/evaluation/registry tests: a real ``mlflow server`` on a free loopback port.

The server has a SQLite backend (the registry needs a database) and serves artifacts
from a temp directory (``--artifacts-destination``), so clients upload over HTTP as they
would to a shared server. It is started in its own session and stopped by its id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ft_helpers import COMMON, PRETRAIN_SHORT, REPO, finetune_overrides, free_port, wait_http_ok

from pipeline.data import shard_dataset
from pipeline.evaluate import evaluate
from pipeline.finetune import run
from pipeline.registry import register
from pipeline.train import launch


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    # The server was started in its own session: signal that group (its uvicorn workers), by id.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real MLflow tracking + registry server; also exported as ``MLFLOW_TRACKING_URI``."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        wait_http_ok(f"{url}/health", proc, 120, "mlflow server")
        os.environ["MLFLOW_TRACKING_URI"] = url
        yield url
    except Exception:
        print((root / "server.log").read_text()[-4000:])
        raise
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        _stop(proc)
        log.close()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The demo's two label spaces, sharded once per session: digits21k (pretraining) and digits."""
    root = tmp_path_factory.mktemp("shards")
    return {
        name: shard_dataset(name, str(root / name), executor="local", progress=False).uri
        for name in ("digits21k", "digits")
    }


@pytest.fixture(scope="session")
def demo_pretrained(demo_shards: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo pretraining recipe, shortened, on 2 CPU ranks through the trainer (a real ZeRO-2 checkpoint)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = tmp_path_factory.mktemp("pretrain")
    overrides = [*COMMON, f"data.root={demo_shards['digits21k']}", f"output_dir={out}", "logging.mlflow=false",
                 *PRETRAIN_SHORT]
    result = launch(REPO / "configs/pretrain/demo.yaml", overrides, launcher="local", nproc=2)
    assert result.finished
    return out


@pytest.fixture(scope="session")
def finetuned(demo_shards, demo_pretrained, mlflow_server, tmp_path_factory):
    """The demo fine-tuning recipe (shortened) from ``demo_pretrained``, logged to the test server."""
    out = tmp_path_factory.mktemp("finetune")
    return run(REPO / "configs/finetune/demo.yaml", finetune_overrides(demo_shards, demo_pretrained, out),
               launcher="local", nproc=2)


@pytest.fixture(scope="session")
def evaluated(finetuned, demo_shards):
    """``finetuned`` evaluated on the digits' val split, logged into the fine-tuning run itself."""
    return evaluate(finetuned.output_dir, demo_shards["digits"], split="val", num_workers=0, progress=False,
                    mlflow_run_id=finetuned.train.mlflow_run_id)


@pytest.fixture(scope="session")
def registered(finetuned, evaluated):
    """``finetuned`` registered by the pipeline from ``evaluated`` (the first version: the champion)."""
    return register(finetuned.output_dir, evaluated)
