"""``shard_dataset``: source -> MDS shards + manifest, resumable and idempotent.

Steps: validate everything that can be validated cheaply (source, config, destination) ->
scan the source in parallel (list + hash every file) -> plan disjoint deterministic parts ->
write the parts not yet done on a pool of workers -> merge each split's index -> manifest.

Layout under ``out``: ``cfg-<config hash[:12]>/`` is the dataset root (``manifest.json``,
``train/``, ``minival/``, ``val/``, and ``_work/`` while unfinished); ``LATEST`` names the
root finished last. A finished root is never written again: re-running the same config is a
no-op, a different config goes to a different root.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.data.config import DEFAULT_MINIVAL_FRACTION, DEFAULT_SHARD_SIZE, ShardConfig
from pipeline.data.executor import LocalExecutor, RayExecutor
from pipeline.data.manifest import FORMAT, LATEST, MANIFEST, canonical_hash, code_version, manifest_hash
from pipeline.data.plan import SPLITS, Plan, make_plan
from pipeline.data.preprocess import DEFAULT_MAX_PIXELS
from pipeline.data.sources import Source, SourceError, list_units, parse_source
from pipeline.data.writer import COLUMNS, part_record_uri
from pipeline.data.writer.shard import WORK_DIR

DEFAULT_MAX_BAD_FRACTION = 0.05


class ShardError(RuntimeError):
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
    """Shard ``source`` into MDS datasets under ``out`` (a local path or ``s3://bucket/prefix``).

    ``executor="ray"`` (default) runs the scan and the writers on Ray (a local Ray of ``workers``
    CPUs is started and stopped when no ``ray_address``/``RAY_ADDRESS`` is given); ``"local"``
    runs them in this process. ``max_bad_fraction``: the job fails, listing examples, when
    more than this share of the input files is quarantined. ``restart=True`` discards an
    unfinished run of the same config whose source changed since (otherwise an error).
    """
    started = time.perf_counter()
    src = parse_source(source)
    config = ShardConfig(src.spec, max_side, jpeg_quality, minival_fraction, seed, max_pixels, shard_size_limit)
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction={max_bad_fraction} (expected 0..1)")
    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers} (expected >= 1)")
    if part_size is not None and part_size < 1:
        raise ValueError(f"part_size={part_size} (expected >= 1)")
    if executor not in ("ray", "local"):
        raise ValueError(f"executor={executor!r} (expected 'ray' or 'local')")
    units = list_units(src)  # cheap (top-level entries only): a missing or empty source fails before any work
    if not units:
        raise SourceError(f"source {src.spec} has nothing to shard")
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
    with runner:
        startup_s = time.perf_counter() - started
        _log(f"{runner.name} executor up with {runner.workers} worker(s) after {startup_s:.1f} s")
        t_scan = time.perf_counter()
        rows = _scan(runner, units, src, progress)
        scan_s = time.perf_counter() - t_scan
        _log(f"scanned {len(rows)} entries in {len(units)} units in {scan_s:.1f} s")
        job_uri = storage.join(root, WORK_DIR, "job.json")
        job = json.loads(storage.read_text(job_uri)) if storage.exists(job_uri) else None
        # An unfinished run fixed the part size; keep it so the parts already done stay valid.
        plan = make_plan(rows, config, (job or {}).get("part_size") or part_size)
        del rows  # the plan holds what is needed; the listing is the driver's largest object
        if job is not None and job.get("fingerprint") != plan.fingerprint:
            if not restart:
                raise ShardError(
                    f"{root} holds an unfinished run of this config over different source contents "
                    f"(files added, removed or changed since). Re-run with restart=True (--restart) to discard "
                    f"it, or restore the source."
                )
            _log(f"restart: discarding the unfinished run in {root}")
            storage.delete_prefix(root)
            job = None
        if not any(p["items"] for p in plan.parts):
            raise SourceError(f"source {src.spec} has no usable image: {_examples(plan.quarantined)}")
        # Fail before the expensive part when the scan alone already finds too many bad files.
        _check_bad(plan.quarantined, plan.listed_files, max_bad_fraction)
        if job is None:
            storage.write_text(job_uri, json.dumps({"config": config.to_dict(), "config_hash": chash,
                                                    "fingerprint": plan.fingerprint, "part_size": plan.part_size}))

        records, resumed = _load_records(root, plan)
        if resumed:
            _log(f"resuming: {resumed} of {len(plan.parts)} parts already done")
        tasks = [
            {"root": root, "split": p["split"], "part": p["part"], "items": p["items"], "config": config.to_dict(),
             "render_size": src.options.get("size", 32), "endpoint": storage.endpoint_url()}
            for p in plan.parts if (p["split"], p["part"]) not in records
        ]
        t_write = time.perf_counter()
        _write(runner, tasks, records, progress, sum(len(p["items"]) for p in plan.parts))
        write_s = time.perf_counter() - t_write
        _log(f"wrote {len(tasks)} parts in {write_s:.1f} s")
        workers_used, executor_name = runner.workers, runner.name

    manifest = _finish(root, src, config, plan, records, max_bad_fraction)
    elapsed = time.perf_counter() - started
    written = manifest["inputs"]["written"]
    manifest["run"] = {"seconds": round(elapsed, 2), "images_per_s": round(written / elapsed, 1) if elapsed else 0,
                       "workers": workers_used, "executor": executor_name, "resumed_parts": resumed,
                       "written_parts": len(tasks), "startup_s": round(startup_s, 2), "scan_s": round(scan_s, 2),
                       "write_s": round(write_s, 2)}
    storage.write_text(manifest_uri, json.dumps(manifest, indent=1))
    _point_latest(out, config)
    storage.delete_prefix(storage.join(root, WORK_DIR))
    manifest["root"] = root
    return ShardResult(root, manifest, skipped=False, resumed_parts=resumed, written_parts=len(tasks))


_CLASS_KINDS = ("empty_class", "unknown_class")


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, smoothing=0.1)


def _scan(runner, units: list[dict], src: Source, progress: bool) -> list[dict]:
    rows = []
    with _bar(0, "scan", progress) as bar:
        for row in runner.scan(units, src):
            rows.append(row)
            bar.update(1)
    return rows


def _examples(quarantined: list[dict], n: int = 8) -> str:
    """Up to ``n`` examples, one of each kind first: the user sees every kind of problem there is."""
    firsts = list({q["kind"]: q for q in reversed(quarantined)}.values())[::-1]
    chosen = firsts[:n] + [q for q in quarantined if q not in firsts][: max(0, n - len(firsts))]
    return "; ".join(f"{q['key']} ({q['kind']}: {q['reason']})" for q in chosen) or "none"


def _check_bad(quarantined: list[dict], listed: int, limit: float) -> None:
    files = [q for q in quarantined if q["kind"] not in _CLASS_KINDS]
    bad = len(files)
    if listed and bad / listed > limit:
        raise ShardError(
            f"{bad} of {listed} input files ({bad / listed:.1%}) are bad, over the limit of {limit:.1%} "
            f"(max_bad_fraction). Examples: {_examples(files)}. Fix or remove them, or raise the limit."
        )


def _load_records(root: str, plan: Plan) -> tuple[dict, int]:
    """The records of parts finished by an earlier run (one listing, not one request per part)."""
    present = {o.uri for o in storage.list_objects(storage.join(root, WORK_DIR, "parts"))}
    records = {}
    for p in plan.parts:
        uri = part_record_uri(root, p["split"], p["part"])
        if uri in present:
            rec = json.loads(storage.read_text(uri))
            if rec.get("items") == len(p["items"]):
                records[(p["split"], p["part"])] = rec
    return records, len(records)


def _write(runner, tasks: list[dict], records: dict, progress: bool, total: int) -> None:
    done = sum(r["items"] for r in records.values())
    with _bar(total, "shard", progress) as bar:
        bar.update(done)
        for rec in runner.write(tasks):
            records[(rec["split"], rec["part"])] = rec
            bar.update(rec["items"])


def _merge_index(root: str, split: str, records: list[dict]) -> dict:
    """Merge the parts' index.json into ``{root}/{split}/index.json`` with streaming's merge_index."""
    from streaming.base.util import merge_index

    with tempfile.TemporaryDirectory(prefix="coatnet-merge-") as tmp:
        paths = []
        for rec in records:
            local = Path(tmp, rec["dir"], "index.json")
            storage.download_file(storage.join(root, rec["dir"], "index.json"), local)
            paths.append(str(local))
        # merge_index logs a warning per call about its temporary folders; nothing to act on.
        logging.disable(logging.WARNING)
        try:
            merge_index(paths, str(Path(tmp, split)))
        finally:
            logging.disable(logging.NOTSET)
        merged = Path(tmp, split, "index.json")
        digest = storage.sha256_file(merged)
        info = storage.upload_file(merged, storage.join(root, split, "index.json"))
    return {"path": f"{split}/index.json", "size": info.size, "sha256": digest}


def _finish(root: str, src: Source, config: ShardConfig, plan: Plan, records: dict, max_bad: float) -> dict:
    quarantined = list(plan.quarantined)
    for key in sorted(records):
        quarantined.extend(records[key]["quarantined"])
    # The parts stay done: a re-run with a higher limit only merges and writes the manifest.
    _check_bad(quarantined, plan.listed_files, max_bad)
    bad_files = sum(q["kind"] not in _CLASS_KINDS for q in quarantined)
    splits, shards = {}, []
    for split in SPLITS:
        recs = [records[k] for k in sorted(records) if k[0] == split]
        if not recs:
            continue
        counts = Counter()
        for r in recs:
            counts.update({int(k): v for k, v in r["class_counts"].items()})
        objects = [o for r in recs for o in r["objects"]]
        index = _merge_index(root, split, recs)
        splits[split] = {
            "samples": sum(r["samples"] for r in recs),
            "bytes": sum(o["size"] for o in objects if not o["path"].endswith("index.json")),
            "class_counts": [counts.get(i, 0) for i in range(len(src.classes))],
            "parts": len(recs),
            "shards": [o["path"] for o in objects if not o["path"].endswith("index.json")],
            "index": index,
        }
        shards.extend({**o, "split": split} for o in objects)
        shards.append({**index, "split": split})
    written = sum(s["samples"] for s in splits.values())
    kinds = Counter(q["kind"] for q in quarantined)
    manifest = {
        "format": FORMAT,
        "source": src.spec,
        "source_fingerprint": plan.fingerprint,
        "config": config.to_dict(),
        "config_hash": config.hash(),
        "classes": list(src.classes),
        "num_classes": len(src.classes),
        "classes_hash": canonical_hash(list(src.classes)),
        "columns": COLUMNS,
        "splits": splits,
        "shards": shards,
        "inputs": {"listed": plan.listed_files, "written": written, "quarantined": bad_files,
                   "bad_fraction": round(bad_files / plan.listed_files, 6) if plan.listed_files else 0.0},
        "quarantine_counts": dict(sorted(kinds.items())),
        "quarantined": quarantined,
        "code_version": code_version(),
    }
    if src.parent_map is not None:
        manifest["parent_classes"] = list(src.parent_classes)
        manifest["parent_map"] = list(src.parent_map)
    manifest["manifest_hash"] = manifest_hash(manifest)
    return manifest
