"""One task = one part: read its units once, hash, preprocess and write them as MDS in ``{root}/{split}/pNNNNN/``.

Each byte of the source is read once, from where it lies (a streamed tar, a file, an object): the
content hash is taken from the bytes in hand, the image is decoded and re-encoded at once, and the
result goes to a spool file on the worker's local disk. Once the part's units are read, the writer
knows everything it needs to decide within the part (no second read): duplicates inside the part
(same bytes: the smallest key is kept), train copies of val images (``val_hashes``, from the val
parts written before), the seeded per-unit minival share, and the seeded order. It then writes
each output split's MDS shards from the spool in that order and uploads them.

Duplicates *across* parts are only known once every part is written: ``pipeline.data.dedup`` finds
them from the per-image tables this task leaves in ``_work/parts/`` (Parquet: hash, key, split,
index), and the manifest masks them (see ``docs/architecture.md``).

MDSWriter writes to a local staging folder; the files are uploaded by ``pipeline.storage.upload_file``
(size and SHA-256 verified, transient errors retried by botocore). The part's *record*
(``_work/parts/{split}-pNNNNN.json``) is written last: its presence marks the part done. A part
killed half-way has no record and is rewritten whole on resume (its content is deterministic).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

# Imported at module level on purpose: Ray's pooled workers import this module once, so the slow
# import of streaming (it pulls in torch) is paid once per worker, not per task.
import pyarrow as pa
import pyarrow.parquet as pq
from streaming import MDSWriter

from pipeline import storage
from pipeline.data.plan import Part, keyed, problem_record
from pipeline.data.preprocess import BadInput, preprocess
from pipeline.data.sources import Item, Source, SourceError, Unit, UnitProblem

COLUMNS = {"image": "bytes", "label": "int", "synset": "str", "key": "str"}
WORK_DIR = "_work"
READ_ATTEMPTS = 5  # a unit whose stream breaks is read again from its start, with back-off
STAGES = ("read", "hash", "preprocess", "write", "upload")


def part_dir(split: str, part: int) -> str:
    return f"{split}/p{part:05d}"


def part_record_uri(root: str, split: str, part: int) -> str:
    return storage.join(root, WORK_DIR, "parts", f"{split}-p{part:05d}.json")


def part_table_uri(root: str, split: str, part: int) -> str:
    return storage.join(root, WORK_DIR, "parts", f"{split}-p{part:05d}.parquet")


class Stopwatch:
    """Wall and CPU seconds per stage of one task (CPU of the whole worker process: upload threads too)."""

    def __init__(self) -> None:
        self.wall: Counter[str] = Counter()
        self.cpu: Counter[str] = Counter()
        self._stage = ""
        self._t = self._c = 0.0

    def switch(self, stage: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        if self._stage:
            self.wall[self._stage] += t - self._t
            self.cpu[self._stage] += c - self._c
        self._stage, self._t, self._c = stage, t, c

    def as_dict(self) -> dict:
        self.switch("")
        return {"wall": {k: round(self.wall[k], 4) for k in STAGES},
                "cpu": {k: round(self.cpu[k], 4) for k in STAGES}}


@dataclass
class Sample:
    key: str
    label: int
    synset: str
    path: str
    group: str
    unit: str
    sha: bytes
    offset: int
    length: int
    kept_original: bool
    size_in: int


def _transient(e: Exception, unit: Unit) -> bool:
    """Worth reading the unit again: a broken stream or a throttled request of a remote unit."""
    if not storage.is_remote(unit.uri) or isinstance(e, SourceError):
        return False
    # lazy: only remote units get here (botocore only once a store is remote, as in pipeline.storage)
    from botocore.exceptions import BotoCoreError, ClientError
    from urllib3.exceptions import HTTPError

    return isinstance(e, BotoCoreError | ClientError | HTTPError | OSError)


class _PartReader:
    """Reads the units of a part once each: hash, preprocess, spool. Collects every outcome."""

    def __init__(self, source: Source, cfg: dict, spool, watch: Stopwatch) -> None:
        self.source, self.cfg, self.spool, self.watch = source, cfg, spool, watch
        self.samples: list[Sample] = []
        self.bad: list[dict] = []
        self.problems: list[dict] = []
        self.listed = 0
        self.unit_digests: dict[str, str] = {}
        self._done: dict[bytes, tuple[int, int, bool] | BadInput] = {}  # same bytes, same outcome

    def read_unit(self, unit: Unit) -> None:
        for attempt in range(READ_ATTEMPTS):
            mark = (len(self.samples), len(self.bad), len(self.problems), self.listed)
            try:
                self.unit_digests[unit.range_id] = self._read(unit)
                return
            except Exception as e:
                if attempt == READ_ATTEMPTS - 1 or not _transient(e, unit):
                    raise
                del self.samples[mark[0]:], self.bad[mark[1]:], self.problems[mark[2]:]
                self.listed = mark[3]
                time.sleep(min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random()))

    def _read(self, unit: Unit) -> str:
        h = hashlib.sha256()
        items = iter(self.source.read(unit))
        while True:
            self.watch.switch("read")
            it = next(items, None)
            if it is None:
                return h.hexdigest()
            if isinstance(it, UnitProblem):
                self.problems.append(problem_record(it))
                continue
            self.listed += 1
            if it.error_kind:
                h.update(f"{it.key}\t{it.error_kind}\n".encode())
                self.bad.append(_quarantine(it, it.error_kind, it.error))
                continue
            self.watch.switch("hash")
            sha = hashlib.sha256(it.data).digest()
            h.update(f"{it.key}\t{sha.hex()}\n".encode())
            done = self._done.get(sha)
            if done is None:
                self.watch.switch("preprocess")
                try:
                    out = preprocess(it.data, max_side=self.cfg["max_side"], jpeg_quality=self.cfg["jpeg_quality"],
                                     max_pixels=self.cfg["max_pixels"])
                    done = (self.spool.tell(), len(out.data), out.kept_original)
                    self.spool.write(out.data)
                except BadInput as e:
                    done = e
                self._done[sha] = done
            if isinstance(done, BadInput):
                self.bad.append(_quarantine(it, done.kind, done.reason))
                continue
            self.samples.append(Sample(it.key, it.label, it.synset, it.path, it.group, unit.range_id, sha,
                                       done[0], done[1], done[2], len(it.data)))


def _quarantine(item: Item | Sample, kind: str, reason: str) -> dict:
    return {"key": item.key, "path": item.path, "kind": kind, "reason": reason}


def _minival(samples: list[Sample], fraction: float, seed: int) -> set[str]:
    """The seeded per-unit share of groups held out as minival (a unit is usually one class)."""
    if fraction <= 0:
        return set()
    by_unit: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        by_unit[s.unit].add(s.group)
    chosen: set[str] = set()
    for groups in by_unit.values():
        if len(groups) < 2:
            continue
        order = sorted(groups, key=lambda g: keyed(f"minival:{seed}:{g}"))
        chosen.update(order[: max(1, round(fraction * len(order)))])
    return chosen


def write_part(part: Part, ctx: dict, val_hashes: dict[bytes, str] | None = None) -> dict:
    """Write one part; return its record (also stored at ``part_record_uri``, last)."""
    if ctx.get("endpoint") and os.environ.get("S3_ENDPOINT_URL") != ctx["endpoint"]:
        # Ray workers of an existing cluster may not share the driver's environment.
        os.environ["S3_ENDPOINT_URL"] = ctx["endpoint"]
        storage.reset_clients()
    cfg, root, source = ctx["config"], ctx["root"], ctx["source"]
    started = time.perf_counter()
    watch = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="coatnet-shard-") as tmp:
        with open(Path(tmp, "spool.bin"), "w+b") as spool:
            reader = _PartReader(source, cfg, spool, watch)
            for unit in part.units:
                reader.read_unit(unit)
            watch.switch("write")
            kept, duplicates = _resolve(reader.samples, val_hashes or {})
            outputs = _assign(kept, part.split, cfg)
            spool.flush()
            written = {split: _write_mds(Path(tmp, part_dir(split, part.part)), items, spool, cfg)
                       for split, items in outputs.items() if items}
        watch.switch("upload")
        for split in SPLIT_OUTPUTS[part.split]:
            # Leftovers of an earlier, killed attempt at this part are replaced, not mixed in.
            storage.delete_prefix(storage.join(root, part_dir(split, part.part)))
        out_records = {}
        for split, (counts, _) in written.items():
            rel = part_dir(split, part.part)
            local = Path(tmp, rel)
            objects = []
            for f in sorted(local.iterdir(), key=lambda p: (p.name == "index.json", p.name)):  # index last
                info = storage.upload_file(f, storage.join(root, rel, f.name))
                objects.append({"path": f"{rel}/{f.name}", "size": info.size,
                                "sha256": info.sha256 or storage.sha256_file(f)})
            out_records[split] = {"dir": rel, "samples": sum(counts.values()),
                                  "class_counts": {str(k): v for k, v in sorted(counts.items())}, "objects": objects}
        _write_table(root, part, outputs, Path(tmp, "table.parquet"))
    samples = [s for items in outputs.values() for s in items]
    record = {
        "split": part.split, "part": part.part, "units": part.unit_ids, "listed": reader.listed,
        "written": len(samples), "outputs": out_records, "quarantined": reader.bad, "duplicates": duplicates,
        "problems": reader.problems, "unit_digests": reader.unit_digests,
        "bytes_in": sum(s.size_in for s in samples), "bytes_out": sum(s.length for s in samples),
        "kept_original": sum(s.kept_original for s in samples),
        "seconds": round(time.perf_counter() - started, 3), "stages": watch.as_dict(),
    }
    if record["listed"] != record["written"] + len(reader.bad) + len(duplicates):
        raise AssertionError(f"part {part.split}/{part.part}: accounting broken: {record['listed']} listed != "
                             f"{record['written']} + {len(reader.bad)} + {len(duplicates)}")
    storage.write_text(part_record_uri(root, part.split, part.part), json.dumps(record))
    return record


SPLIT_OUTPUTS = {"train": ("train", "minival"), "val": ("val",)}


def _resolve(samples: list[Sample], val_hashes: dict[bytes, str]) -> tuple[list[Sample], list[dict]]:
    """Drop train copies of val images and repeats within the part (the smallest key is kept)."""
    duplicates = []
    best: dict[bytes, Sample] = {}
    for s in samples:
        if s.sha in val_hashes:
            duplicates.append(_quarantine(s, "duplicate", f"same bytes as {val_hashes[s.sha]}"))
        elif s.sha not in best or s.key < best[s.sha].key:
            best[s.sha] = s
    keep = {id(s) for s in best.values()}
    for s in samples:
        if s.sha in best and id(s) not in keep:
            duplicates.append(_quarantine(s, "duplicate", f"same bytes as {best[s.sha].key}"))
    return [s for s in samples if id(s) in keep], duplicates


def _assign(samples: list[Sample], split: str, cfg: dict) -> dict[str, list[Sample]]:
    """Output split of each sample, each split in the seeded order (a keyed hash of the key)."""
    outputs: dict[str, list[Sample]] = {s: [] for s in SPLIT_OUTPUTS[split]}
    minival = _minival(samples, cfg["minival_fraction"], cfg["seed"]) if split == "train" else set()
    for s in samples:
        outputs["minival" if s.group in minival else split].append(s)
    for items in outputs.values():
        items.sort(key=lambda s: keyed(f"order:{cfg['seed']}:{s.key}"))
    return outputs


def _write_mds(local: Path, items: list[Sample], spool, cfg: dict) -> tuple[Counter, int]:
    counts: Counter[int] = Counter()
    with MDSWriter(out=str(local), columns=COLUMNS, hashes=["sha1"], size_limit=cfg["shard_size_limit"]) as writer:
        for s in items:
            data = os.pread(spool.fileno(), s.length, s.offset)
            writer.write({"image": data, "label": int(s.label), "synset": s.synset, "key": s.key})
            counts[int(s.label)] += 1
    return counts, len(items)


def _write_table(root: str, part: Part, outputs: dict[str, list[Sample]], local: Path) -> None:
    """The per-image record of the part (hash, key, split, index in its split's part): the dedup's input."""
    rows = [(s, split, i) for split, items in outputs.items() for i, s in enumerate(items)]
    table = pa.table({
        "sha256": pa.array([s.sha for s, _, _ in rows], pa.binary(32)),
        "key": pa.array([s.key for s, _, _ in rows], pa.string()),
        "path": pa.array([s.path for s, _, _ in rows], pa.string()).dictionary_encode(),
        "split": pa.array([sp for _, sp, _ in rows], pa.string()).dictionary_encode(),
        "index": pa.array([i for _, _, i in rows], pa.int32()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(part_table_uri(root, part.split, part.part), buf.getvalue())
