"""Duplicates by content across parts: a reduce over the per-image tables the writers leave in ``_work/``.

Hashes are only known once the bytes have been read, and each byte is read once, in the task that
also decodes and writes it; so duplicates are resolved in two places, neither of which re-reads data:

* **Val against train, before train is written.** Val parts are written first; ``val_hashes`` gives
  the train writers every val image's hash, and a train copy of a val image is dropped before it
  reaches a shard (a val image must never be trained on).
* **Everything else, after writing.** ``find_duplicates`` reads the tables (hash, key, split, index;
  ~70 bytes an image), one hash bucket per task, and returns only the repeats: for each content, the
  copy with the smallest (val first, then key) is kept and every other copy is *masked*: it stays in
  its shard, and the manifest lists it (``splits.<split>.masked``: sample indices to skip, and a
  ``duplicate`` quarantine record). Rewriting the shards instead would mean reading them all again,
  since at ImageNet's duplicate rate nearly every shard holds one.

Memory: a bucket task holds one bucket's rows; ``buckets_for`` keeps that near ``ROWS_PER_BUCKET``.
The driver only ever holds the repeats.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

ROWS_PER_BUCKET = 500_000  # ~150 MB of Python rows in a reduce task
READ_THREADS = 16


def buckets_for(rows: int) -> int:
    return max(1, math.ceil(rows / ROWS_PER_BUCKET))


def _read_table(uri: str, columns: list[str]):
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)), columns=columns)


def val_hashes(table_uris: list[str]) -> dict[bytes, str]:
    """hash -> the smallest val key with those bytes, from the val parts' tables."""
    out: dict[bytes, str] = {}
    for uri in table_uris:
        t = _read_table(uri, ["sha256", "key"])
        for sha, key in zip(t.column("sha256").to_pylist(), t.column("key").to_pylist()):
            if sha not in out or key < out[sha]:
                out[sha] = key
    return out


def find_duplicates(bucket: int, buckets: int, tables: list[tuple[str, str, int]]) -> list[dict]:
    """The masked copies among the rows whose hash falls in ``bucket``.

    ``tables``: (table URI, source split, part) of every part. Returns
    ``{"key", "path", "split", "part", "index", "keeper"}`` for every copy that is not kept.
    """
    groups: dict[bytes, list[tuple]] = {}
    columns = ["sha256", "key", "path", "split", "index"]
    with ThreadPoolExecutor(READ_THREADS) as pool:  # small objects: latency-bound, so a few requests at once
        for i in range(0, len(tables), 4 * READ_THREADS):  # a bounded window: one bucket's rows stay in memory
            chunk = tables[i:i + 4 * READ_THREADS]
            for src_split, part, t in pool.map(lambda x: (x[1], x[2], _read_table(x[0], columns)), chunk):
                cols = [t.column(c).to_pylist() for c in columns]
                for sha, key, path, split, index in zip(*cols):
                    if buckets > 1 and int.from_bytes(sha[:4], "big") % buckets != bucket:
                        continue
                    groups.setdefault(sha, []).append((split != "val", key, path, split, src_split, part, index))
    masked = []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        rows.sort()
        keeper = rows[0][1]
        for _, key, path, split, src_split, part, index in rows[1:]:
            masked.append({"key": key, "path": path, "split": split, "source_split": src_split, "part": part,
                           "index": index, "keeper": keeper})
    return masked


def mask_indices(masked: list[dict], offsets: dict[tuple[str, str, int], int]) -> dict[str, list[int]]:
    """Per output split, the sorted sample indices (in the merged index) of the masked copies.

    ``offsets[(split, source_split, part)]``: where that part's samples start in the split's index.
    """
    out: dict[str, list[int]] = {}
    for m in masked:
        out.setdefault(m["split"], []).append(offsets[(m["split"], m["source_split"], m["part"])] + m["index"])
    return {k: sorted(v) for k, v in out.items()}

