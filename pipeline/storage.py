"""Object storage: a local directory or ``s3://bucket/prefix``, behind one small interface.

Every stage (sharding, checkpoints, fine-tuning, registry artifacts) reads and writes
through these functions, so a path and an S3 URI are interchangeable everywhere.

S3 goes through boto3 with the standard AWS credential chain. ``S3_ENDPOINT_URL``
points it at an S3-compatible store (MinIO, moto's server); it is the variable
mosaicml-streaming reads too, so both libraries reach the same endpoint.
Transient errors are retried with exponential back-off by botocore's own retry
machinery (``standard`` mode) rather than a hand-written loop; uploads are then
verified by size and SHA-256 against what was sent.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import UserError

S3_SCHEME = "s3://"
MAX_ATTEMPTS = int(os.environ.get("COATNET_S3_MAX_ATTEMPTS", "8"))


class StorageError(UserError, RuntimeError):
    """An object-store operation failed in a way the user must fix (credentials, bucket, path)."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    tag: str = field(default="", compare=False)  # S3 ETag, or the local file's mtime in ns: a change detector
    sha256: str = field(default="", compare=False)  # known when this process just wrote the object


@dataclass(frozen=True)
class DirListing:
    """The immediate children of a folder or prefix: sub-folder names and files, each sorted by name."""

    dirs: list[str]
    files: list[ObjectInfo]


def is_remote(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def join(uri: str | os.PathLike, *parts: str) -> str:
    base = str(uri)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(base, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_remote(uri):
        raise ValueError(f"not an s3:// URI: {uri}")
    rest = uri[len(S3_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri}")
    return bucket, key


def endpoint_url() -> str | None:
    return os.environ.get("S3_ENDPOINT_URL") or None


@functools.cache
def _client_for(endpoint: str | None):
    # lazy: boto3 takes a while to import and local paths never need it
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}, connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def s3_client():
    """A boto3 S3 client for the current ``S3_ENDPOINT_URL`` (cached per endpoint)."""
    return _client_for(endpoint_url())


def reset_clients() -> None:
    """Forget cached clients, so the next one reads the endpoint and credentials anew (after they changed)."""
    _client_for.cache_clear()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return Path(uri).exists()
    from botocore.exceptions import ClientError  # lazy, as in _client_for

    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def read_bytes(uri: str) -> bytes:
    if not is_remote(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3(uri)
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes, *, verify: bool = True) -> ObjectInfo:
    """Write ``data`` atomically (local: temp file + rename) and verify it landed intact."""
    if not is_remote(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return ObjectInfo(uri, len(data))
    bucket, key = split_s3(uri)
    digest = sha256_bytes(data)
    s3_client().put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": digest})
    if verify:
        _verify_remote(uri, len(data), digest)
    return ObjectInfo(uri, len(data))


def write_text(uri: str, text: str) -> ObjectInfo:
    return write_bytes(uri, text.encode("utf-8"))


def _verify_remote(uri: str, size: int, digest: str) -> None:
    bucket, key = split_s3(uri)
    head = s3_client().head_object(Bucket=bucket, Key=key)
    got_size = int(head["ContentLength"])
    got_digest = head.get("Metadata", {}).get("sha256")
    if got_size != size or (got_digest is not None and got_digest != digest):
        raise StorageError(
            f"verification failed for {uri}: sent {size} bytes sha256={digest[:12]}, "
            f"store has {got_size} bytes sha256={str(got_digest)[:12]}"
        )


def upload_file(local: str | os.PathLike, uri: str, *, verify: bool = True) -> ObjectInfo:
    local = Path(local)
    size = local.stat().st_size
    if not is_remote(uri):
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.resolve() != local.resolve():
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)
        return ObjectInfo(uri, size)
    bucket, key = split_s3(uri)
    digest = sha256_file(local)
    s3_client().upload_file(str(local), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})
    if verify:
        _verify_remote(uri, size, digest)
    return ObjectInfo(uri, size, sha256=digest)


def download_file(uri: str, local: str | os.PathLike) -> Path:
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    if is_remote(uri):
        bucket, key = split_s3(uri)
        s3_client().download_file(bucket, key, str(tmp))
    else:
        shutil.copyfile(uri, tmp)
    os.replace(tmp, local)
    return local


def list_objects(uri: str) -> Iterator[ObjectInfo]:
    """Every object under ``uri`` (recursively), as full URIs or paths."""
    if not is_remote(uri):
        root = Path(uri)
        if not root.exists():
            return
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                yield ObjectInfo(str(p), st.st_size, str(st.st_mtime_ns))
        return
    bucket, prefix = split_s3(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    paginator = s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield ObjectInfo(f"{S3_SCHEME}{bucket}/{obj['Key']}", int(obj["Size"]), obj.get("ETag", "").strip('"'))


def list_dir(uri: str, *, page_size: int | None = None) -> DirListing:
    """The folders and files directly under ``uri`` (S3: ``Delimiter="/"``, every page of the listing).

    A missing local folder or an empty prefix gives an empty listing; a missing bucket, denied access
    or missing credentials raise botocore's errors (``access_problem`` turns them into a sentence).
    """
    if not is_remote(uri):
        dirs, files = [], []
        try:
            entries = sorted(os.scandir(uri), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return DirListing([], [])
        for e in entries:
            if e.is_dir():
                dirs.append(e.name)
            elif e.is_file():
                st = e.stat()
                files.append(ObjectInfo(e.path, st.st_size, str(st.st_mtime_ns)))
        return DirListing(dirs, files)
    bucket, prefix = split_s3(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    dirs, files = [], []
    paginator = s3_client().get_paginator("list_objects_v2")
    pages = {"PageSize": page_size} if page_size else {}  # S3 returns at most 1000 keys a page anyway
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/", PaginationConfig=pages):
        dirs.extend(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
        files.extend(ObjectInfo(f"{S3_SCHEME}{bucket}/{o['Key']}", int(o["Size"]), o.get("ETag", "").strip('"'))
                     for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    return DirListing(sorted(dirs), sorted(files, key=lambda o: o.uri))


def has_objects(uri: str) -> bool:
    """Whether anything exists under ``uri`` (one request: a folder with entries, or a non-empty prefix)."""
    if not is_remote(uri):
        p = Path(uri)
        return p.is_dir() and any(p.iterdir())
    bucket, prefix = split_s3(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0


@contextmanager
def open_stream(uri: str) -> Iterator[BinaryIO]:
    """A sequential reader of one object: one GET for S3 (botocore retries the request itself, not a
    broken body: callers that stream long objects retry the whole read), a plain file locally."""
    if not is_remote(uri):
        with open(uri, "rb") as f:
            yield f
        return
    bucket, key = split_s3(uri)
    body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    try:
        yield body
    finally:
        body.close()


def access_problem(e: BaseException, uri: str) -> str | None:
    """A sentence for an object-store error the user must fix (no bucket, denied, no credentials, no
    endpoint), or None for anything else (a transient error, a bug)."""
    # lazy, as in _client_for
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket = split_s3(uri)[0] if is_remote(uri) else ""
    if isinstance(e, NoCredentialsError):
        return (f"no AWS credentials to read {uri}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
                "(or give the machine an instance role)")
    if isinstance(e, EndpointConnectionError):
        return f"cannot reach the S3 endpoint for {uri} ({e}): check S3_ENDPOINT_URL and the network"
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket",):
            return f"bucket {bucket!r} of {uri} does not exist: check the name (and S3_ENDPOINT_URL for S3-compatible stores)"
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return f"access to {uri} denied: check the credentials' permissions (s3:ListBucket, s3:GetObject) on bucket {bucket!r}"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return f"the AWS credentials were refused reading {uri} ({code}): refresh or fix them"
    return None


def relative(uri: str, root: str) -> str:
    """The part of ``uri`` below ``root``, with ``/`` separators."""
    if is_remote(uri):
        return uri[len(root.rstrip("/")) + 1:]
    return Path(uri).relative_to(root).as_posix()


def upload_dir(local_dir: str | os.PathLike, uri: str) -> list[ObjectInfo]:
    local_dir = Path(local_dir)
    return [
        upload_file(p, join(uri, p.relative_to(local_dir).as_posix()))
        for p in sorted(local_dir.rglob("*"))
        if p.is_file()
    ]


def download_dir(uri: str, local_dir: str | os.PathLike) -> list[Path]:
    return [download_file(o.uri, Path(local_dir, relative(o.uri, uri))) for o in list_objects(uri)]


def delete_prefix(uri: str) -> None:
    if not is_remote(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    bucket, _ = split_s3(uri)
    keys = [{"Key": split_s3(o.uri)[1]} for o in list_objects(uri)]
    for i in range(0, len(keys), 1000):
        s3_client().delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + 1000]})


def check_writable(uri: str) -> None:
    """Fail at once, before any work, when ``uri`` cannot be written (missing bucket, credentials, permissions)."""
    probe = join(uri, ".write-probe")
    try:
        write_bytes(probe, b"ok")
        if is_remote(probe):
            bucket, key = split_s3(probe)
            s3_client().delete_object(Bucket=bucket, Key=key)
        else:
            Path(probe).unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001 - every cause gets the same actionable message
        hint = (
            "check AWS credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE), that the bucket exists, "
            "and S3_ENDPOINT_URL for S3-compatible stores"
            if is_remote(uri)
            else "check that the directory can be created and written"
        )
        raise StorageError(f"cannot write to {uri}: {type(e).__name__}: {e}; {hint}") from e
