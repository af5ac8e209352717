"""Fixtures of the data tests: one shared local Ray and a faulty/slow S3 proxy (helpers: shard_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from shard_helpers import FaultyProxy


@pytest.fixture(scope="module")
def ray_session(s3_endpoint: str) -> Iterator[str]:
    """One small local Ray for the module's tests (start-up is slow on 2 cores); yields its address.

    Module-scoped, not session-scoped: other areas start Ray clusters of their own (with a dashboard, for
    Ray Jobs), and ``ray.init`` refuses a second cluster in a process that still holds one.

    Depends on ``s3_endpoint`` so that Ray's workers inherit the S3 endpoint and test credentials.
    """
    import ray

    if ray.is_initialized():  # another area's fixture started one: share it, leave it to its owner
        yield ray.get_runtime_context().gcs_address
        return
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def faulty_proxy(s3_endpoint: str):
    """A factory: ``with faulty_proxy(fail_every=3, delay_s=0.0) as proxy: ...`` (``proxy.url``)."""
    return lambda **kw: FaultyProxy(s3_endpoint, **kw)
