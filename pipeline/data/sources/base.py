"""What every source kind has: a spec, a class list, *units* to list, and items to read from a unit.

A ``Source`` is parsed from a spec (``imagenet21k:s3://raw/winter21``) by the class registered for
its kind. The driver asks it for its units (``list_units``: the top level only, one entry per class
folder, tar or chunk, never one per image); workers ``describe`` units whose size is not known from
that listing (a class folder: count and change-detecting digest of its files) and ``read`` them,
item by item, straight from the local disk or the object store. A unit may be cut into fixed
ranges (``Unit.range``) so that no task is larger than ``RANGE_ITEMS`` images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import ClassVar

from pipeline.errors import UserError

RANGE_ITEMS = 8192  # the largest unit a task reads: bigger class folders are cut into fixed ranges


class SourceError(UserError, ValueError):
    """The source spec is invalid, or the source is missing, empty or unreadable: fix it before any work."""


@dataclass(frozen=True)
class Unit:
    """One listing grain: a class folder or tar, a chunk of a flat folder, a generated class.

    ``n`` (items) and ``nbytes`` are -1 while unknown (a tar's member count is only known once read);
    ``digest`` identifies the unit's listing (names, sizes, ETags or mtimes), so a resumed job notices a
    changed source. ``start``/``stop`` select a fixed range of the unit's sorted items.
    """

    id: str  # stable and unique within the source, e.g. "train/n01440764"
    split: str  # "train" or "val": where the source put it
    name: str  # the class (synset) of every item, or "" when items carry their own (flat val folders)
    uri: str = ""  # folder, tar or prefix; "" for generated units
    form: str = "gen"  # "dir" | "tar" | "flat" | "gen"
    n: int = -1
    nbytes: int = -1
    digest: str = ""
    start: int = 0
    stop: int | None = None
    params: tuple = ()  # kind-specific, hashable (e.g. the digit of a digits unit)

    @property
    def needs_description(self) -> bool:
        return self.n < 0 and self.form in ("dir", "flat")

    @property
    def splittable(self) -> bool:
        return self.form != "tar"

    @property
    def range_id(self) -> str:
        return self.id if self.stop is None else f"{self.id}[{self.start}:{self.stop}]"

    def ranges(self, size: int = RANGE_ITEMS) -> list[Unit]:
        """This unit cut into ranges of at most ``size`` items (itself when small or not cuttable)."""
        if not self.splittable or self.n <= size:
            return [self]
        return [replace(self, start=i, stop=min(i + size, self.n), n=min(i + size, self.n) - i)
                for i in range(0, self.n, size)]


@dataclass
class Item:
    """One image read from a unit: its bytes (or why there are none) and where it belongs."""

    key: str  # stable sample key, e.g. "train/n01440764/x.JPEG"
    label: int
    synset: str
    path: str  # where it was read from (a file, an object, or the tar holding it)
    data: bytes | None = None
    group: str = ""  # items of one group go to the same split (all rotations of a digits sample)
    error_kind: str = ""
    error: str = ""

    def __post_init__(self) -> None:
        if not self.group:
            self.group = self.key


@dataclass
class UnitProblem:
    """A problem of a whole unit (an unknown class, an empty or unreadable folder or tar)."""

    key: str
    path: str
    kind: str  # empty_class | unknown_class | unreadable_class
    reason: str


def digest(*parts: object) -> str:
    # surrogateescape: file names that are not UTF-8 still identify themselves.
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8", "surrogateescape")).hexdigest()


def parse_options(text: str, allowed: set[str], kind: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep:
            raise SourceError(f"bad option {part!r} for {kind}: expected key=value")
        opts[k.strip()] = v.strip()
    unknown = set(opts) - allowed
    if unknown:
        raise SourceError(f"unknown option(s) {sorted(unknown)} for {kind}; allowed: {sorted(allowed)}")
    return opts


def int_option(opts: dict[str, str], name: str, default: int, lo: int, hi: int, kind: str) -> int:
    try:
        value = int(opts.get(name, default))
    except ValueError:
        raise SourceError(f"{kind} option {name} must be an integer, got {opts[name]!r}") from None
    if not lo <= value <= hi:
        raise SourceError(f"{kind} option {name} must be in [{lo}, {hi}], got {value}")
    return value


@dataclass(frozen=True)
class Source:
    """Base of every source kind. Subclasses register with ``@register`` and implement the three steps."""

    kind: ClassVar[str] = ""
    usage: ClassVar[str] = ""  # the spec's shape, for error messages and --help
    rank: ClassVar[int] = 50  # where the kind comes in the list of kinds shown to the user

    spec: str  # normalised spec: part of the config hash
    classes: tuple[str, ...]
    parent_classes: tuple[str, ...] | None = None
    parent_map: tuple[int, ...] | None = None
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def parse(cls, rest: str) -> Source:
        """Validate the part of the spec after ``kind:`` and build the source (cheap: one listing at most)."""
        raise NotImplementedError

    def list_units(self) -> list[Unit]:
        """The units of the source, on the driver: top-level entries only (one listing per split)."""
        raise NotImplementedError

    def describe(self, unit: Unit) -> Unit:
        """The unit with ``n``, ``nbytes`` and ``digest`` filled (a worker lists one class folder)."""
        return unit

    def read(self, unit: Unit) -> Iterator[Item | UnitProblem]:
        """The unit's items in a fixed order, with their bytes; never raises for a bad file (it becomes an
        ``Item`` with ``error_kind``). Raises on transient store errors: the caller retries the unit."""
        raise NotImplementedError

    def __getstate__(self) -> dict:
        # The label index is rebuilt on demand: do not ship 21K entries with every task.
        return {**self.__dict__, "_index": {}}

    def label_of(self, name: str) -> int:
        if not self._index:
            self._index.update({s: i for i, s in enumerate(self.classes)})
        return self._index.get(name, -1)

    @property
    def render_options(self) -> dict:
        return {}


SOURCES: dict[str, type[Source]] = {}


def register(cls: type[Source]) -> type[Source]:
    SOURCES[cls.kind] = cls
    return cls


def parse_source(spec: str) -> Source:
    """Validate ``spec`` and build its source: ``kind:rest`` with ``kind`` one of the registered kinds."""
    kind, _, rest = spec.strip().partition(":")
    cls = SOURCES.get(kind.strip().lower())
    if cls is None:
        usages = ", ".join(c.usage for c in sorted(SOURCES.values(), key=lambda c: c.rank))
        raise SourceError(f"unknown source {spec!r}: use one of {usages}")
    return cls.parse(rest)
