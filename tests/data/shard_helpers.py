"""Helpers of the data tests (a module with a unique name: test directories are not packages)."""

from __future__ import annotations

import http.client
import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse


class FaultyProxy:
    """An HTTP proxy in front of the S3 server that fails every ``fail_every``-th request with a 503
    (S3's "SlowDown") and can delay every request: a real failure path for the client's retries."""

    def __init__(self, upstream: str, fail_every: int = 0, delay_s: float = 0.0):
        self.upstream = urlparse(upstream)
        self.fail_every = fail_every
        self.delay_s = delay_s
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
                if fail:
                    msg = b"<Error><Code>SlowDown</Code><Message>injected by the test proxy</Message></Error>"
                    self.send_response(503)
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
                if self.command != "HEAD":
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

    from pipeline import storage

    clean_stale_shared_memory()
    ds = StreamingDataset(remote=storage.join(root, split), local=str(tmp_path / f"cache-{split}-{os.urandom(4).hex()}"),
                          shuffle=False, batch_size=1)
    return [ds[i] for i in range(len(ds))]
