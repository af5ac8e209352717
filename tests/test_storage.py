"""pipeline.storage against a local directory and a real S3-compatible HTTP server."""

from __future__ import annotations

import pytest

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip_and_listing(root: str, tmp_path) -> None:
    storage.write_text(storage.join(root, "a.txt"), "hello")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "b.bin").write_bytes(b"\x00" * 1000)
    storage.upload_dir(src, storage.join(root, "dir"))

    assert storage.read_text(storage.join(root, "a.txt")) == "hello"
    assert storage.exists(storage.join(root, "dir", "sub", "b.bin"))
    assert not storage.exists(storage.join(root, "missing"))
    listed = {storage.relative(o.uri, root): o.size for o in storage.list_objects(root)}
    assert listed == {"a.txt": 5, "dir/sub/b.bin": 1000}

    back = storage.download_dir(storage.join(root, "dir"), tmp_path / "back")
    assert [p.read_bytes() for p in back] == [b"\x00" * 1000]

    storage.delete_prefix(storage.join(root, "dir"))
    assert not storage.exists(storage.join(root, "dir", "sub", "b.bin"))


def test_unwritable_destination_fails_before_work(s3_endpoint: str) -> None:
    with pytest.raises(storage.StorageError, match="cannot write to s3://no-such-bucket"):
        storage.check_writable("s3://no-such-bucket/x")


def test_split_s3_rejects_bucketless_uri() -> None:
    with pytest.raises(ValueError, match="without a bucket"):
        storage.split_s3("s3:///key")
