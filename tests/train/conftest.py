"""Fixtures of the training tests: digits21k shards on the local S3 server, and a tiny recipe."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pipeline import storage

# A tiny, fast version of the demo recipe: 2 CPU ranks, coatnet_pico at 32x32, no MLflow server.
TINY = [
    "model.name=coatnet_pico",
    "model.img_size=32",
    "data.num_workers=1",
    # Other engineers' streaming jobs may share this machine: do not unlink their shared memory.
    "data.clean_stale_shared_memory=false",
    "train.global_batch_size=32",
    "train.micro_batch_size=16",
    "eval.batch_size=32",
    "eval.max_samples=64",
    "logging.progress_bar=false",
    "logging.mlflow=false",
    "logging.interval_steps=2",
    "schedule.warmup_epochs=0",
    "schedule.warmup_steps=2",
]


@pytest.fixture(autouse=True)
def _fresh_s3_clients():
    # boto3 clients are cached per endpoint with the credentials they found; tests change both.
    storage._client_for.cache_clear()
    yield
    storage._client_for.cache_clear()


@pytest.fixture(scope="session")
def digits_shards(s3_endpoint: str, tmp_path_factory) -> str:
    """digits21k (2 rotations: 20 classes) sharded once per session into a bucket on the local S3 server."""
    from pipeline.data import shard_dataset

    storage._client_for.cache_clear()
    bucket = f"train-{uuid.uuid4().hex[:10]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    result = shard_dataset("digits21k:rotations=2,size=32", f"s3://{bucket}/digits21k", executor="local",
                           progress=False)
    return result.uri


@pytest.fixture
def recipe() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo.yaml"


def tiny(shards: str, out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={shards}", f"output_dir={out}", *extra]
