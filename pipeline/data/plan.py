"""From the scanned listing to disjoint, deterministic parts: quarantine, dedup, splits, seeded order.

Every choice here is a pure function of the listing and the config (never of the number of
workers or of the order in which the scan finished), so an interrupted job that is resumed
recomputes exactly the same parts and only writes the missing ones.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass

from pipeline.data.config import ShardConfig

SPLITS = ("train", "minival", "val")


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Plan:
    parts: list[dict]  # {"split", "part", "items": [row, ...]}
    quarantined: list[dict]  # {"key", "path", "kind", "reason"} found by the scan and dedup
    listed_files: int
    fingerprint: str  # hash of the sorted (key, sha256) listing: the source's content identity
    part_size: int

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for p in self.parts:
            out[p["split"]] += len(p["items"])
        return dict(out)


def auto_part_size(n: int) -> int:
    """~32 parts (work for 32 writers at once) up to 262K images, then parts of 8192 (~1 GiB of JPEG)."""
    return max(64, min(8192, math.ceil(n / 32)))


def quarantine_record(row: dict, kind: str, reason: str) -> dict:
    return {"key": row["key"], "path": row["path"], "kind": kind, "reason": reason}


def make_plan(rows: list[dict], config: ShardConfig, part_size: int | None = None) -> Plan:
    rows = sorted(rows, key=lambda r: r["key"])
    fingerprint = _h("\n".join(f"{r['key']}\t{r['sha256']}\t{r['error_kind']}" for r in rows))
    quarantined: list[dict] = []
    files = [r for r in rows if r["kind"] != "class"]
    for r in rows:
        if r["error_kind"]:
            quarantined.append(quarantine_record(r, r["error_kind"], r["error"]))
    good = [r for r in files if not r["error_kind"]]

    # Duplicates: keep val copies over train ones (a val image must not also be trained on), then the first key.
    seen: dict[str, str] = {}
    unique = []
    for r in sorted(good, key=lambda r: (r["split"] != "val", r["key"])):
        first = seen.setdefault(r["sha256"], r["key"])
        if first != r["key"]:
            quarantined.append(quarantine_record(r, "duplicate", f"same bytes as {first}"))
        else:
            unique.append(r)

    # minival: a seeded, per-class share of train *groups* (all rotations of a digits sample stay together).
    by_class: dict[int, set[str]] = defaultdict(set)
    for r in unique:
        if r["split"] == "train":
            by_class[r["label"]].add(r["group"])
    minival_groups: set[str] = set()
    if config.minival_fraction > 0:
        for groups in by_class.values():
            if len(groups) < 2:
                continue
            order = sorted(groups, key=lambda g: _h(f"minival:{config.seed}:{g}"))
            minival_groups.update(order[: max(1, round(config.minival_fraction * len(order)))])

    by_split: dict[str, list[dict]] = defaultdict(list)
    for r in unique:
        split = "val" if r["split"] == "val" else ("minival" if r["group"] in minival_groups else "train")
        by_split[split].append(r)

    size = part_size or auto_part_size(len(unique))
    parts = []
    for split in SPLITS:
        # The seeded shuffle: order by a keyed hash, independent of how the listing was produced.
        items = sorted(by_split.get(split, []), key=lambda r: _h(f"order:{config.seed}:{r['key']}"))
        for i in range(0, len(items), size):
            parts.append({"split": split, "part": i // size, "items": items[i:i + size]})
    return Plan(parts, quarantined, len(files), fingerprint, size)
