"""Fixtures shared by every test area: a real S3-compatible HTTP server, and a clean environment.

Area-specific fixtures live in ``tests/<area>/conftest.py``.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from pipeline import storage
from pipeline.data import shard_dataset
from pipeline.storage import s3_client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port; boto3 and streaming reach it over HTTP like AWS."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "S3_ENDPOINT_URL": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_S3_ENV = ("S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(autouse=True)
def _fresh_s3_clients() -> Iterator[None]:
    # boto3 clients are cached per endpoint with the credentials they found; tests change both.

    storage.reset_clients()
    yield
    storage.reset_clients()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the local S3 server; returns ``s3://NAME``."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def masked_shards(tmp_path_factory) -> str:
    """A local dataset root with masked samples in both splits: synthetic images (4 classes), every 5th a copy of
    the one before it in another class, dealt into parts of ~32 so that most copies are found across parts."""
    out = tmp_path_factory.mktemp("masked-shards")
    result = shard_dataset("synthetic:n=320,classes=4,dup_every=5", str(out), executor="local", part_size=32,
                           minival_fraction=0.2, progress=False)
    assert all(split["masked"] for split in result.manifest["splits"].values())
    return result.uri
