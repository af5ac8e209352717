"""Helpers of the data tests (a module with a unique name: test directories are not packages)."""

from __future__ import annotations

import http.client
import io
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

from pipeline import storage
from pipeline.data import verify_shards


class FaultyProxy:
    """An HTTP proxy in front of the S3 server that fails every ``fail_every``-th request with a 503
    (S3's "SlowDown"), can delay every request, (``deny=True``) answer every request with S3's 403
    AccessDenied as a bucket policy would, or (``break_every``) cut a tar's body off half-way: real
    failure paths for the client's retries and errors."""

    def __init__(self, upstream: str, fail_every: int = 0, delay_s: float = 0.0, deny: bool = False,
                 break_every: int = 0):
        self.upstream = urlparse(upstream)
        self.fail_every = fail_every
        self.delay_s = delay_s
        self.deny = deny
        self.break_every = break_every  # every n-th GET of a .tar: half the body, then the connection drops
        self.tar_gets = 0
        self.broken = 0
        self.requests = 0
        self.failed = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = io.BytesIO()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out.getvalue()
                        out.write(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy.fail_every and proxy.requests % proxy.fail_every == 0
                    proxy.failed += bool(fail)
                if proxy.delay_s:
                    threading.Event().wait(proxy.delay_s)
                if fail or proxy.deny:
                    code, status = ("AccessDenied", 403) if proxy.deny else ("SlowDown", 503)
                    msg = f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                                 headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer carries the object's length, with no body.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                cut = False
                if self.command == "GET" and proxy.break_every and self.path.split("?")[0].endswith(".tar"):
                    with proxy._lock:
                        proxy.tar_gets += 1
                        cut = proxy.tar_gets % proxy.break_every == 0
                        proxy.broken += cut
                if cut:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_image(seed: int, size=(48, 40), mode: str = "RGB"):
    """A small deterministic image with content that differs per seed (so no accidental duplicates)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def write_image(path: Path, seed: int, fmt: str = "JPEG", mode: str = "RGB", size=(48, 40), **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(make_image(seed, size, mode), fmt, **kw))
    return path


def read_split(root: str, split: str, tmp_path) -> list[dict]:
    """Every sample of a split, read through streaming's StreamingDataset (as training will)."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(remote=storage.join(root, split), local=str(tmp_path / f"cache-{split}-{os.urandom(4).hex()}"),
                          shuffle=False, batch_size=1)
    return [ds[i] for i in range(len(ds))]


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar holding ``members`` (name -> bytes), in that order."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def all_keys(res, tmp_path) -> list[str]:
    return [s["key"] for split in res.manifest["splits"] for s in read_split(res.uri, split, tmp_path)]


def check_accounting(res, raw: dict, tmp_path) -> None:
    """Every image of the ``in21k_bucket`` release is accounted for, once: written + quarantined + duplicates = listed."""
    m = res.manifest
    expected = raw["expected"]
    inputs = m["inputs"]
    assert inputs["listed"] == len(expected)
    assert inputs["written"] + inputs["quarantined"] + inputs["duplicates"] == inputs["listed"]
    assert inputs["quarantined"] == sum(v == "quarantined" for v in expected.values()) == 2
    assert inputs["duplicates"] == 1
    keys = all_keys(res, tmp_path)
    masked = sum(len(split["masked"]) for split in m["splits"].values())
    physical = set(keys)
    assert len(keys) == len(physical)  # no sample twice
    unique = physical - {q["key"] for q in m["quarantined"] if q["kind"] == "duplicate"}
    assert unique == {k for k, v in expected.items() if v == "written"}
    assert len(unique) == inputs["written"] and masked == inputs["masked"]
    assert {q["kind"] for q in m["quarantined"]} >= {"unknown_class", "empty_file", "duplicate"}
    assert verify_shards(res.uri).ok
