"""``shard_dataset``: source -> MDS shards + manifest, resumable and idempotent, with a driver that stays small.

Steps: validate what can be validated cheaply (source, config, destination) -> list the source's
units (the driver lists the top level; workers count class folders) -> plan parts of whole units
(``plan.py``) -> write the val parts, then the train parts, on a pool of workers, each reading its
units once (``writer/shard.py``) -> find duplicates across parts (``dedup.py``) -> merge each split's
index -> manifest.

What the driver holds grows with the number of units and parts, never with the number of images: the
per-image records live in the parts' tables under ``_work/`` and the reduce reads them on workers.
Quarantine records come back with the parts (bounded by ``max_bad_fraction``).

Layout under ``out``: ``cfg-<config hash[:12]>/`` is the dataset root (``manifest.json``,
``train/``, ``minival/``, ``val/``, and ``_work/`` while unfinished); ``LATEST`` names the root
finished last. A finished root is never written again: re-running the same config is a no-op, a
different config goes to a different root.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from streaming.base.util import merge_index

from pipeline import storage
from pipeline.data import dedup
from pipeline.data.config import DEFAULT_MINIVAL_FRACTION, DEFAULT_SHARD_SIZE, ShardConfig, ShardConfigError
from pipeline.data.executor import LocalExecutor, RayExecutor
from pipeline.data.manifest import FORMAT, LATEST, MANIFEST, canonical_hash, code_version, manifest_hash
from pipeline.data.plan import SPLITS, Part, Plan, make_plan
from pipeline.data.preprocess import DEFAULT_MAX_PIXELS
from pipeline.data.sources import Source, SourceError, Unit, parse_source
from pipeline.data.sources.base import digest
from pipeline.data.writer import COLUMNS, part_record_uri, write_part
from pipeline.data.writer.shard import STAGES, WORK_DIR, part_table_uri
from pipeline.errors import UserError

DEFAULT_MAX_BAD_FRACTION = 0.05
DESCRIBE_BATCH = 64  # class folders counted per task
CLASS_KINDS = ("empty_class", "unknown_class", "unreadable_class")
PROGRESS_EVERY_S = 10.0
IO_THREADS = 16  # small objects (part records, part indexes) fetched at once: request latency, not bandwidth


class ShardError(UserError, RuntimeError):
    """The job cannot go on (too many bad inputs, changed source on resume, ...); the message says why."""


@dataclass(frozen=True)
class ShardResult:
    uri: str  # the dataset root (holds manifest.json, train/, minival/, val/)
    manifest: dict
    skipped: bool  # True: this config was already sharded, nothing was done
    resumed_parts: int = 0  # parts found done by an earlier, interrupted run
    written_parts: int = 0


def config_root(out: str, config: ShardConfig) -> str:
    """Where ``config`` is written under ``out``: one root per config, so configs never mix."""
    return storage.join(out, f"cfg-{config.hash()[:12]}")


def _point_latest(out: str, config: ShardConfig) -> None:
    storage.write_text(storage.join(out, LATEST), f"cfg-{config.hash()[:12]}")


def _log(msg: str) -> None:
    print(f"[shard] {msg}", file=sys.stderr, flush=True)


def shard_dataset(
    source: str,
    out: str,
    *,
    max_side: int = 320,
    jpeg_quality: int = 90,
    workers: int | None = None,
    minival_fraction: float = DEFAULT_MINIVAL_FRACTION,
    seed: int = 0,
    ray_address: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    shard_size_limit: int = DEFAULT_SHARD_SIZE,
    part_size: int | None = None,
    executor: str = "ray",
    progress: bool = True,
    restart: bool = False,
) -> ShardResult:
    """Shard ``source`` (a path or ``s3://`` tree, digits, ...) into MDS datasets under ``out`` (path or ``s3://``).

    ``executor="ray"`` (default) runs the tasks on Ray (a local Ray of ``workers`` CPUs is started and
    stopped when no ``ray_address``/``RAY_ADDRESS`` is given); ``"local"`` runs them in this process.
    ``part_size``: about how many images one task writes (default: ~32 parts, at most 8192 images each).
    ``max_bad_fraction``: the job fails, listing examples, when more than this share of the input
    files is quarantined. ``restart=True`` discards an unfinished run of the same config whose source
    changed since (otherwise an error). ``progress``: a line with rates every few seconds on stderr.
    """
    started = time.perf_counter()
    src = parse_source(source)
    config = ShardConfig(src.spec, max_side, jpeg_quality, minival_fraction, seed, max_pixels, shard_size_limit)
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ShardConfigError(f"max_bad_fraction={max_bad_fraction} (expected 0..1)")
    if workers is not None and workers < 1:
        raise ShardConfigError(f"workers={workers} (expected >= 1)")
    if part_size is not None and part_size < 1:
        raise ShardConfigError(f"part_size={part_size} (expected >= 1)")
    if executor not in ("ray", "local"):
        raise ShardConfigError(f"executor={executor!r} (expected 'ray' or 'local')")
    units = src.list_units()  # the top level only: a missing or empty source fails before any work
    if not units:
        raise SourceError(f"source {src.spec} has nothing to shard (no class folder, tar or image)")
    storage.check_writable(out)
    root = config_root(out, config)
    chash = config.hash()

    manifest_uri = storage.join(root, MANIFEST)
    if storage.exists(manifest_uri):
        manifest = json.loads(storage.read_text(manifest_uri))
        if manifest.get("config_hash") == chash:
            _point_latest(out, config)
            _log(f"already done: {root} holds this config ({chash[:12]}); nothing to do")
            manifest["root"] = root
            return ShardResult(root, manifest, skipped=True)

    runner = RayExecutor(workers, ray_address) if executor == "ray" else LocalExecutor()
    timings: dict[str, float] = {}
    with runner:
        timings["startup_s"] = time.perf_counter() - started
        _log(f"{runner.name} executor up with {runner.workers} worker(s) after {timings['startup_s']:.1f} s")
        t = time.perf_counter()
        units = _describe(runner, src, units)
        job_uri = storage.join(root, WORK_DIR, "job.json")
        job = json.loads(storage.read_text(job_uri)) if storage.exists(job_uri) else None
        # An unfinished run fixed the part size; keep it so the parts already done stay valid.
        plan = make_plan(units, src, config, (job or {}).get("part_size") or part_size)
        timings["list_s"] = time.perf_counter() - t
        _log(f"listed {len(units)} units in {timings['list_s']:.1f} s: about {plan.estimated_items} images in "
             f"{len(plan.parts)} parts of ~{plan.part_size}")
        if job is not None and job.get("fingerprint") != plan.fingerprint:
            if not restart:
                raise ShardError(
                    f"{root} holds an unfinished run of this config over a different listing of the source "
                    f"(files added, removed or changed since): re-run with --restart (restart=True) to discard "
                    f"it, or restore the source"
                )
            _log(f"restart: discarding the unfinished run in {root}")
            storage.delete_prefix(root)
            job = None
        if not plan.parts:
            raise SourceError(f"source {src.spec} has no usable image: {_examples(plan.problems)}")
        if job is None:
            storage.write_text(job_uri, json.dumps({"config": config.to_dict(), "config_hash": chash,
                                                    "fingerprint": plan.fingerprint, "part_size": plan.part_size}))
        records = _load_records(root, plan)
        resumed = len(records)
        if resumed:
            _log(f"resuming: {resumed} of {len(plan.parts)} parts already done")
        ctx = runner.put({"root": root, "config": config.to_dict(), "source": src})
        meter = _Progress(plan, records, max_bad_fraction, progress)
        t = time.perf_counter()
        todo = {split: [p for p in plan.split_parts(split) if (split, p.part) not in records] for split in ("val", "train")}
        _write(runner, todo["val"], records, meter, ctx, None)
        val_parts = plan.split_parts("val")
        # Computed where it is used (a worker, on Ray): the driver only passes a reference on.
        hashes = runner.defer(dedup.val_hashes, [part_table_uri(root, "val", p.part) for p in val_parts]) \
            if val_parts and todo["train"] else None
        _write(runner, todo["train"], records, meter, ctx, hashes)
        timings["write_s"] = time.perf_counter() - t
        meter.finish()
        t = time.perf_counter()
        masked = _find_duplicates(runner, root, plan, records)
        timings["dedup_s"] = time.perf_counter() - t
        workers_used, executor_name = runner.workers, runner.name

    t = time.perf_counter()
    manifest = _finish(root, src, config, plan, records, masked, max_bad_fraction)
    timings["finish_s"] = time.perf_counter() - t
    elapsed = time.perf_counter() - started
    written = manifest["inputs"]["written"]
    todo_n = len(todo["val"]) + len(todo["train"])
    this_run = {(p.split, p.part) for p in todo["val"] + todo["train"]}
    stages = _stage_totals(records[k] for k in records if k in this_run)
    manifest["run"] = {"seconds": round(elapsed, 2), "images_per_s": round(written / elapsed, 1) if elapsed else 0,
                       "workers": workers_used, "executor": executor_name, "resumed_parts": resumed,
                       "written_parts": todo_n, **{k: round(v, 2) for k, v in timings.items()}, "stages": stages}
    storage.write_text(manifest_uri, json.dumps(manifest, indent=1))
    _point_latest(out, config)
    storage.delete_prefix(storage.join(root, WORK_DIR))
    manifest["root"] = root
    _log(f"done in {elapsed:.1f} s: {written} images written ({manifest['run']['images_per_s']:.0f}/s)")
    return ShardResult(root, manifest, skipped=False, resumed_parts=resumed, written_parts=todo_n)


def _describe_batch(units: list[Unit], src: Source) -> list[Unit]:
    return [src.describe(u) for u in units]


def _describe(runner, src: Source, units: list[Unit]) -> list[Unit]:
    """Fill the counts of units the top-level listing could not (class folders), on the workers."""
    todo = [i for i, u in enumerate(units) if u.needs_description]
    if not todo:
        return units
    out = list(units)
    batches = [todo[i:i + DESCRIBE_BATCH] for i in range(0, len(todo), DESCRIBE_BATCH)]
    # One batch is listed here: not worth a task (its worker's first import of the pipeline takes longer).
    mapper = runner if len(batches) > 1 else LocalExecutor()
    shared = mapper.put(src)
    for b, described in mapper.map(_describe_batch, [[units[i] for i in batch] for batch in batches], shared):
        for i, u in zip(batches[b], described):
            out[i] = u
    return out


class _Progress:
    """Counts from the part records, a line with rates every ``PROGRESS_EVERY_S``, and the early stop on bad input."""

    def __init__(self, plan: Plan, records: dict, max_bad: float, enabled: bool) -> None:
        self.plan, self.max_bad, self.enabled = plan, max_bad, enabled
        self.parts = len(records)
        self.listed = sum(r["listed"] for r in records.values())
        self.bad = [q for r in records.values() for q in r["quarantined"]]
        self.start_listed, self.bytes_in, self.t0 = self.listed, 0, time.perf_counter()
        self.last = self.t0

    def update(self, rec: dict) -> None:
        self.parts += 1
        self.listed += rec["listed"]
        self.bytes_in += rec["bytes_in"]
        self.bad.extend(rec["quarantined"])
        # Certain failure: more bad files than the limit allows of the most images the source can hold.
        if len(self.bad) > self.max_bad * self.plan.max_items:
            raise ShardError(
                f"{len(self.bad)} bad input files already, over the limit of {self.max_bad:.1%} (max_bad_fraction) "
                f"of at most {self.plan.max_items} listed. Examples: {_examples(self.bad)}. Fix or remove them, or "
                "raise the limit (the parts written so far are kept)."
            )
        now = time.perf_counter()
        if self.enabled and (now - self.last >= PROGRESS_EVERY_S or self.parts == len(self.plan.parts)):
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        dt = max(now - self.t0, 1e-9)
        rate = (self.listed - self.start_listed) / dt
        left = max(0, self.plan.estimated_items - self.listed)
        eta = f", ETA {_duration(left / rate)}" if rate > 0 and left else ""
        _log(f"parts {self.parts}/{len(self.plan.parts)}, {self.listed} images read ({rate:.0f}/s, "
             f"{self.bytes_in / dt / 1e6:.1f} MB/s in), {len(self.bad)} quarantined{eta}")

    def finish(self) -> None:
        if self.enabled and self.last == self.t0:
            self._line(time.perf_counter())


def _duration(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else (f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h")


def _write(runner, parts: list[Part], records: dict, meter: _Progress, ctx, hashes) -> None:
    for i, rec in runner.map(write_part, parts, ctx, hashes):
        records[(parts[i].split, parts[i].part)] = rec
        meter.update(rec)


def _examples(quarantined: list[dict], n: int = 8) -> str:
    """Up to ``n`` examples, one of each kind first: the user sees every kind of problem there is."""
    firsts = list({q["kind"]: q for q in reversed(quarantined)}.values())[::-1]
    chosen = firsts[:n] + [q for q in quarantined if q not in firsts][: max(0, n - len(firsts))]
    return "; ".join(f"{q['key']} ({q['kind']}: {q['reason']})" for q in chosen) or "none"


def _check_bad(bad: list[dict], listed: int, limit: float) -> None:
    if listed and len(bad) / listed > limit:
        raise ShardError(
            f"{len(bad)} of {listed} input files ({len(bad) / listed:.1%}) are bad, over the limit of {limit:.1%} "
            f"(max_bad_fraction). Examples: {_examples(bad)}. Fix or remove them, or raise the limit "
            "(the parts written are kept: a re-run only finishes the job)."
        )


def _load_records(root: str, plan: Plan) -> dict:
    """The records of parts finished by an earlier run (one listing, then the records a few at a time)."""
    present = {o.uri for o in storage.list_objects(storage.join(root, WORK_DIR, "parts"))}
    done = [p for p in plan.parts if part_record_uri(root, p.split, p.part) in present]
    with ThreadPoolExecutor(IO_THREADS) as pool:
        texts = list(pool.map(lambda p: storage.read_text(part_record_uri(root, p.split, p.part)), done))
    records = {}
    for p, text in zip(done, texts):
        rec = json.loads(text)
        if rec.get("units") == p.unit_ids:  # a record of another plan (units dealt differently) does not count
            records[(p.split, p.part)] = rec
    return records


def _find_duplicates(runner, root: str, plan: Plan, records: dict) -> list[dict]:
    tables = [(part_table_uri(root, p.split, p.part), p.split, p.part) for p in plan.parts]
    buckets = dedup.buckets_for(sum(r["written"] for r in records.values()))
    masked = []
    for _, found in runner.map(dedup.find_duplicates, range(buckets), buckets, tables):
        masked.extend(found)
    return sorted(masked, key=lambda m: m["key"])


def _stage_totals(records) -> dict:
    """CPU and wall seconds per stage summed over the tasks of this run: where the workers' time went."""
    wall, cpu = Counter(), Counter()
    for r in records:
        wall.update(r["stages"]["wall"])
        cpu.update(r["stages"]["cpu"])
    return {"wall": {k: round(wall[k], 2) for k in STAGES}, "cpu": {k: round(cpu[k], 2) for k in STAGES}}


def _merge_index(root: str, split: str, dirs: list[str]) -> dict:
    """Merge the parts' index.json into ``{root}/{split}/index.json`` with streaming's merge_index."""
    with tempfile.TemporaryDirectory(prefix="coatnet-merge-") as tmp:
        paths = [str(Path(tmp, d, "index.json")) for d in dirs]
        with ThreadPoolExecutor(IO_THREADS) as pool:
            list(pool.map(lambda d: storage.download_file(storage.join(root, d, "index.json"), Path(tmp, d, "index.json")),
                          dirs))
        # merge_index logs a warning per call about its temporary folders; nothing to act on.
        logging.disable(logging.WARNING)
        try:
            merge_index(paths, str(Path(tmp, split)))
        finally:
            logging.disable(logging.NOTSET)
        merged = Path(tmp, split, "index.json")
        digest_ = storage.sha256_file(merged)
        info = storage.upload_file(merged, storage.join(root, split, "index.json"))
    return {"path": f"{split}/index.json", "size": info.size, "sha256": digest_}


def _finish(root: str, src: Source, config: ShardConfig, plan: Plan, records: dict, masked: list[dict],
            max_bad: float) -> dict:
    keys = sorted(records, key=lambda k: (k[0] != "val", k))
    bad = [q for k in keys for q in records[k]["quarantined"]]
    listed = sum(records[k]["listed"] for k in keys)
    # The parts stay done: a re-run with a higher limit only merges and writes the manifest.
    _check_bad(bad, listed, max_bad)
    problems = list(plan.problems) + [q for k in keys for q in records[k]["problems"]]
    dropped = [q for k in keys for q in records[k]["duplicates"]]
    masked_records = [{"key": m["key"], "path": m["path"], "kind": "duplicate",
                       "reason": f"same bytes as {m['keeper']} (masked: still in the {m['split']} shards)"}
                      for m in masked]
    splits, shards, offsets = {}, [], {}
    for split in SPLITS:
        parts = [(k, records[k]["outputs"][split]) for k in keys if split in records[k]["outputs"]]
        if not parts:
            continue
        counts: Counter[int] = Counter()
        start = 0
        for k, o in parts:
            offsets[(split, k[0], k[1])] = start
            start += o["samples"]
            counts.update({int(c): v for c, v in o["class_counts"].items()})
        objects = [obj for _, o in parts for obj in o["objects"]]
        index = _merge_index(root, split, [o["dir"] for _, o in parts])
        splits[split] = {
            "samples": start,
            "bytes": sum(o["size"] for o in objects if not o["path"].endswith("index.json")),
            "class_counts": [counts.get(i, 0) for i in range(len(src.classes))],
            "parts": len(parts),
            "shards": [o["path"] for o in objects if not o["path"].endswith("index.json")],
            "index": index,
            "masked": [],
        }
        shards.extend({**o, "split": split} for o in objects)
        shards.append({**index, "split": split})
    for split, idx in dedup.mask_indices(masked, offsets).items():
        splits[split]["masked"] = idx
    physical = sum(s["samples"] for s in splits.values())
    written = physical - len(masked)
    duplicates = len(dropped) + len(masked)
    if written + len(bad) + duplicates != listed:
        raise AssertionError(f"accounting broken: {written} written + {len(bad)} quarantined + {duplicates} "
                             f"duplicates != {listed} listed")
    if written == 0:
        raise SourceError(f"source {src.spec} has no usable image: {_examples(problems + bad)}")
    quarantined = problems + sorted(bad + dropped + masked_records, key=lambda q: q["key"])
    kinds = Counter(q["kind"] for q in quarantined)
    unit_digests = sorted(d for k in keys for d in records[k]["unit_digests"].items())
    manifest = {
        "format": FORMAT,
        "source": src.spec,
        "source_fingerprint": digest(*(f"{u}:{d}" for u, d in unit_digests)),
        "listing_fingerprint": plan.fingerprint,
        "config": config.to_dict(),
        "config_hash": config.hash(),
        "classes": list(src.classes),
        "num_classes": len(src.classes),
        "classes_hash": canonical_hash(list(src.classes)),
        "columns": COLUMNS,
        "splits": splits,
        "shards": shards,
        "inputs": {"listed": listed, "written": written, "quarantined": len(bad), "duplicates": duplicates,
                   "masked": len(masked), "bad_fraction": round(len(bad) / listed, 6) if listed else 0.0},
        "quarantine_counts": dict(sorted(kinds.items())),
        "quarantined": quarantined,
        "code_version": code_version(),
    }
    if src.parent_map is not None:
        manifest["parent_classes"] = list(src.parent_classes)
        manifest["parent_map"] = list(src.parent_map)
    manifest["manifest_hash"] = manifest_hash(manifest)
    return manifest
