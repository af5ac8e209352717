"""One writer = one part: read, preprocess and write its items as MDS in ``{root}/{split}/pNNNNN/``.

MDSWriter writes to a local staging folder and the files are then uploaded by
``pipeline.storage.upload_file`` rather than by MDSWriter's own remote upload, because that
verifies every object after upload (size and SHA-256) and retries transient errors with
back-off, and we need each shard's hash for the manifest anyway.

The part's *record* (``{root}/_work/parts/{split}-pNNNNN.json``) is written last, after every
object of the part is verified: its presence is what marks the part done. A part killed
half-way has no record and is rewritten whole on resume (its content is deterministic), so
nothing is duplicated or lost.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

# Imported at module level on purpose: Ray's pooled workers import this module while they scan,
# so the slow import of streaming (it pulls in torch) is paid once per worker, not per phase.
from streaming import MDSWriter

from pipeline import storage
from pipeline.data.preprocess import BadInput, preprocess
from pipeline.data.sources import read_item

COLUMNS = {"image": "bytes", "label": "int", "synset": "str", "key": "str"}
WORK_DIR = "_work"


def part_dir(split: str, part: int) -> str:
    return f"{split}/p{part:05d}"


def part_record_uri(root: str, split: str, part: int) -> str:
    return storage.join(root, WORK_DIR, "parts", f"{split}-p{part:05d}.json")


def write_part(task: dict) -> dict:
    """Write one part and return its record (also stored at ``part_record_uri``)."""
    if task.get("endpoint"):
        # Ray workers of an existing cluster may not share the driver's environment.
        os.environ["S3_ENDPOINT_URL"] = task["endpoint"]
    cfg = task["config"]
    root, split, part = task["root"], task["split"], int(task["part"])
    rel_dir = part_dir(split, part)
    started = time.perf_counter()
    quarantined: list[dict] = []
    class_counts: Counter[int] = Counter()
    bytes_in = bytes_out = kept = 0
    with tempfile.TemporaryDirectory(prefix="coatnet-shard-") as tmp:
        local = Path(tmp, rel_dir)
        with MDSWriter(out=str(local), columns=COLUMNS, hashes=["sha1"], size_limit=cfg["shard_size_limit"]) as writer:
            for item in task["items"]:
                try:
                    data = read_item(item, task.get("render_size", 32))
                    out = preprocess(data, max_side=cfg["max_side"], jpeg_quality=cfg["jpeg_quality"],
                                     max_pixels=cfg["max_pixels"])
                except BadInput as e:
                    quarantined.append({"key": item["key"], "path": item["path"], "kind": e.kind, "reason": e.reason})
                    continue
                except OSError as e:
                    quarantined.append({"key": item["key"], "path": item["path"], "kind": "unreadable",
                                        "reason": f"{type(e).__name__}: {e}"})
                    continue
                writer.write({"image": out.data, "label": int(item["label"]), "synset": item["synset"],
                              "key": item["key"]})
                class_counts[int(item["label"])] += 1
                bytes_in += len(data)
                bytes_out += len(out.data)
                kept += out.kept_original
        remote_dir = storage.join(root, rel_dir)
        # Leftovers of an earlier, killed attempt at this part are replaced, not mixed in.
        storage.delete_prefix(remote_dir)
        files = sorted(local.iterdir(), key=lambda p: (p.name == "index.json", p.name))  # index last
        objects = []
        for f in files:
            digest = storage.sha256_file(f)
            info = storage.upload_file(f, storage.join(remote_dir, f.name))
            objects.append({"path": f"{rel_dir}/{f.name}", "size": info.size, "sha256": digest})
    record = {
        "split": split, "part": part, "dir": rel_dir, "samples": sum(class_counts.values()),
        "items": len(task["items"]), "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
        "objects": objects, "quarantined": quarantined, "bytes_in": bytes_in, "bytes_out": bytes_out,
        "kept_original": kept, "seconds": round(time.perf_counter() - started, 3),
    }
    storage.write_text(part_record_uri(root, split, part), json.dumps(record))
    return record
