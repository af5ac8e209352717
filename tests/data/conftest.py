"""Fixtures of the data tests: one shared local Ray, a faulty/slow S3 proxy, and an ImageNet-21K-shaped release
of per-synset tars in a bucket (helpers: shard_helpers.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from shard_helpers import FaultyProxy, encode, make_image, tar_bytes

from pipeline import storage
from pipeline.data import synsets

TARS, PER_TAR = 16, 5


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


@pytest.fixture(scope="module")
def in21k_bucket(s3_endpoint: str) -> dict:
    """An ImageNet-21K-shaped release in a bucket: per-synset tars (and one synset as a folder of objects),
    with a corrupt image, an empty one, a hidden file, a repeat across tars and a synset not in the list."""
    storage.reset_clients()
    bucket = f"raw-{uuid.uuid4().hex[:10]}"
    s3 = storage.s3_client()
    s3.create_bucket(Bucket=bucket)
    names = synsets.in21k_synsets()
    expected: dict[str, str] = {}  # key -> what becomes of it
    for t in range(TARS):
        syn = names[100 * t + 7]
        members = {}
        for j in range(PER_TAR):
            members[f"{syn}_{j}.JPEG"] = encode(make_image(1000 * t + j), "JPEG")
            expected[f"train/{syn}/{syn}_{j}.JPEG"] = "written"
        if t == 0:
            members["broken.JPEG"] = encode(make_image(99), "JPEG")[:200]
            expected[f"train/{syn}/broken.JPEG"] = "quarantined"
        if t == 1:
            members["empty.JPEG"] = b""
            members["._resource_fork"] = b"junk"  # hidden: never listed
            expected[f"train/{syn}/empty.JPEG"] = "quarantined"
        if t == 2:
            members["repeat.JPEG"] = encode(make_image(1000 * 3 + 0), "JPEG")  # the first image of tar 3
            expected[f"train/{syn}/repeat.JPEG"] = "written"
        s3.put_object(Bucket=bucket, Key=f"winter21/{syn}.tar", Body=tar_bytes(members))
    copies = sorted([f"train/{names[207]}/repeat.JPEG", f"train/{names[307]}/{names[307]}_0.JPEG"])
    expected[copies[1]] = "duplicate"  # of the smaller key, which is kept
    folder = names[20000]
    for j in range(3):
        s3.put_object(Bucket=bucket, Key=f"winter21/{folder}/f{j}.JPEG", Body=encode(make_image(50_000 + j), "JPEG"))
        expected[f"train/{folder}/f{j}.JPEG"] = "written"
    s3.put_object(Bucket=bucket, Key="winter21/n99999999.tar", Body=tar_bytes({"x.JPEG": encode(make_image(7), "JPEG")}))
    return {"source": f"imagenet21k:s3://{bucket}/winter21", "bucket": f"s3://{bucket}", "expected": expected}
