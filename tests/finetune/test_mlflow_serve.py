"""The champion the pipeline registered, in MLflow's own serving: `mlflow models serve` and `pyfunc`.

The server is MLflow's scoring server started the way a user starts it (`mlflow models serve -m
models:/NAME@champion --env-manager local`, the virtual environment's `bin` on PATH as when it is
activated) on a free loopback port. Batches of 1 and 3 real validation images, preprocessed as the model's
logged preprocessing says, must get the predictions `coatnet evaluate` made for the same images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from ft_helpers import free_port, wait_http_ok

from pipeline.cli import main
from pipeline.data import resolve_root
from pipeline.evaluate import Preprocessing
from pipeline.registry import CHAMPION

pytestmark = [pytest.mark.slow]


def _images(shards: dict[str, str], pre: Preprocessing, keys: list[str]) -> np.ndarray:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(Path(resolve_root(shards["digits"]), "val")), shuffle=False, batch_size=8)
    by_key = {}
    for i in range(len(ds)):
        row = ds[i]
        if row["key"] in keys:
            by_key[row["key"]] = pre.decode(row["image"])
    return torch.stack([by_key[k] for k in keys]).numpy().astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _assert_same_predictions(logits: np.ndarray, topk: np.ndarray, confidence: np.ndarray) -> None:
    assert logits.shape == (len(topk), 10)
    order = np.argsort(-logits, axis=1, kind="stable")[:, : topk.shape[1]]
    assert np.array_equal(order, topk)
    np.testing.assert_allclose(_softmax(logits).max(1), confidence, rtol=1e-4, atol=1e-5)


class _Server:
    """`mlflow models serve` in its own session, stopped by its process group id."""

    def __init__(self, uri: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        venv_bin = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
        self.log = log
        self.proc = subprocess.Popen(
            [str(Path(venv_bin, "mlflow")), "models", "serve", "-m", uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> None:
        wait_http_ok(f"{self.url}/ping", self.proc, timeout, "mlflow models serve", self.log)

    def predict(self, x: np.ndarray) -> np.ndarray:
        req = urllib.request.Request(f"{self.url}/invocations", data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.mark.timeout(600)
def test_champion_served_by_mlflow_predicts_what_evaluate_saw(registered, demo_shards, mlflow_server, tmp_path):
    uri = f"models:/{registered.name}@{CHAMPION}"
    assert mlflow.MlflowClient().get_model_version_by_alias(registered.name, CHAMPION).version == registered.version
    # Start the server first: it loads the model while `coatnet evaluate` scores the same champion.
    server = _Server(uri, tmp_path / "serve.log")
    try:
        rc = main(["evaluate", "--model", uri, "--data", demo_shards["digits"], "--max-samples", "4",
                   "--out", str(tmp_path / "eval"), "--no-mlflow", "--workers", "0"])
        assert rc == 0
        seen = np.load(tmp_path / "eval" / "predictions_registry.npz")
        keys = seen["keys"].tolist()
        assert len(keys) == 4
        meta = mlflow.models.get_model_info(uri).metadata
        x = _images(demo_shards, Preprocessing.from_dict(meta["preprocessing"]), keys)
        assert x.shape[1:] == (3, meta["img_size"], meta["img_size"])

        server.wait_ready(timeout=300)
        for idx in ([0], [1, 2, 3]):  # a batch of 1 and a batch of 3
            _assert_same_predictions(server.predict(x[idx]), seen["topk"][idx], seen["confidence"][idx])

        pyfunc = mlflow.pyfunc.load_model(uri)
        for idx in ([0], [1, 2, 3]):
            logits = np.asarray(pyfunc.predict(x[idx]), dtype=np.float32)
            _assert_same_predictions(logits, seen["topk"][idx], seen["confidence"][idx])
    finally:
        server.stop()
