"""Fixtures of the Prefect flow tests.

- ``prefect_harness``: one temporary Prefect API server (SQLite in a temp dir) for the whole session, via
  ``prefect_test_harness``; start-up is slow on 2 contended cores, hence the long timeout.
- ``flow_store``: one bucket on the local S3 server shared by the session's flow runs, so the shards the
  first run writes are the cache later runs reuse (as on a real store).
- ``TINY``: overrides that shrink the demo recipes to seconds of CPU training.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from flow_helpers import REPO

from pipeline.storage import s3_client


@pytest.fixture(scope="session", autouse=True)
def _repo_cwd() -> Iterator[None]:
    """Config paths in flow parameters are relative to the repository root, as in prefect.yaml."""
    old = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """A temporary Prefect API for in-process flow runs; returns its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def flow_store(s3_endpoint: str) -> str:
    name = f"flows-{uuid.uuid4().hex[:10]}"
    s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def flow_tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
