"""From the listed units to disjoint, deterministic parts: one task of work each.

The driver plans per *unit* (a class folder or tar, a fixed range of a big folder), never per image:
the plan's size grows with the number of classes, not of images. A part is a few units whose items
add up to about ``part_size`` images; units are dealt to parts in a seeded order, so every part
(and every MDS shard in it, once the writer has shuffled the part) mixes several classes.

Every choice is a pure function of the listing and the config (never of the number of workers or
of the order in which tasks finish), so an interrupted job that is resumed recomputes exactly the
same parts and only writes the missing ones.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from pipeline.data.config import ShardConfig
from pipeline.data.sources import Source, Unit, UnitProblem
from pipeline.data.sources.base import digest

SPLITS = ("train", "minival", "val")
SOURCE_SPLITS = ("val", "train")  # val parts are written first: their hashes keep val images out of train
DEFAULT_IMAGE_BYTES = 110_000  # ImageNet's mean file size: the item estimate of a tar before it is read
TAR_MEMBER_MIN_BYTES = 512  # a tar member takes at least one header block: an upper bound on a tar's count


def keyed(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Part:
    split: str  # the source split of its units: "val", or "train" (which also yields minival)
    part: int
    units: tuple[Unit, ...]
    estimate: int  # items, exact when every unit's count is known

    @property
    def unit_ids(self) -> list[str]:
        return [u.range_id for u in self.units]


@dataclass
class Plan:
    parts: list[Part]
    problems: list[dict] = field(default_factory=list)  # unit-level quarantine records found by the listing
    fingerprint: str = ""  # the listing's identity (names, sizes, ETags/mtimes): a resume sees a changed source
    part_size: int = 0
    estimated_items: int = 0
    max_items: int = 0  # an upper bound of the items listed: exceeding the bad limit of it is certain failure

    def split_parts(self, split: str) -> list[Part]:
        return [p for p in self.parts if p.split == split]


def auto_part_size(n: int) -> int:
    """~32 parts (work for 32 writers at once) up to 262K images, then parts of 8192 (~1 GiB of JPEG)."""
    return max(64, min(8192, math.ceil(n / 32)))


def problem_record(p: UnitProblem) -> dict:
    return {"key": p.key, "path": p.path, "kind": p.kind, "reason": p.reason}


def make_plan(units: list[Unit], source: Source, config: ShardConfig, part_size: int | None = None) -> Plan:
    units = sorted(units, key=lambda u: u.id)
    fingerprint = digest(*(f"{u.id}:{u.n}:{u.nbytes}:{u.digest}" for u in units))
    problems: list[dict] = []
    good: list[Unit] = []
    for u in units:
        if u.name and source.label_of(u.name) < 0:
            problems.append(problem_record(UnitProblem(u.id, u.uri, "unknown_class",
                                                       f"{u.name!r} is not in the class list ({source.kind})")))
        elif u.n == 0:
            problems.append(problem_record(UnitProblem(u.id, u.uri, "empty_class", "class folder has no files")))
        else:
            good.append(u)

    known = [u for u in good if u.n > 0 and u.nbytes > 0]
    mean_bytes = sum(u.nbytes for u in known) / sum(u.n for u in known) if known else DEFAULT_IMAGE_BYTES

    def estimate(u: Unit) -> int:
        return u.n if u.n >= 0 else max(1, round(u.nbytes / mean_bytes))

    ranges = [r for u in good for r in u.ranges()]
    total = sum(estimate(r) for r in ranges)
    max_items = sum(r.n if r.n >= 0 else max(1, r.nbytes // TAR_MEMBER_MIN_BYTES) for r in ranges)
    size = part_size or auto_part_size(total)
    parts: list[Part] = []
    for split in SOURCE_SPLITS:
        # The seeded deal: units in the order of a keyed hash, packed greedily up to ``size`` items a part.
        chosen = sorted((r for r in ranges if r.split == split),
                        key=lambda r: keyed(f"unit:{config.seed}:{r.range_id}"))
        packed: list[list[Unit]] = [[]]
        counts = [0]
        for r in chosen:
            if counts[-1] >= size:
                packed.append([])
                counts.append(0)
            packed[-1].append(r)
            counts[-1] += estimate(r)
        parts += [Part(split, i, tuple(us), c) for i, (us, c) in enumerate(zip(packed, counts)) if us]
    return Plan(parts, problems, fingerprint, size, total, max_items)
