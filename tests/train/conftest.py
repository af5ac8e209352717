"""Fixtures of the training tests: digits21k shards on the local S3 server, and the demo recipe."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.data import shard_dataset


@pytest.fixture(scope="session")
def digits_shards(s3_endpoint: str, tmp_path_factory) -> str:
    """digits21k (2 rotations: 20 classes) sharded once per session into a bucket on the local S3 server."""
    storage.reset_clients()
    bucket = f"train-{uuid.uuid4().hex[:10]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    result = shard_dataset("digits21k:rotations=2,size=32", f"s3://{bucket}/digits21k", executor="local",
                           progress=False)
    return result.uri


@pytest.fixture
def recipe() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo.yaml"
