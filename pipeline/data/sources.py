"""Where images come from: parsing a source spec, listing it in units, scanning a unit, reading an item.

Source specs (``coatnet shard --source ...``):

* ``imagefolder:PATH``: one folder per class (names sorted give the labels). If ``PATH/train``
  exists, class folders are read from ``PATH/train`` and, when present, ``PATH/val``.
* ``imagenet21k:PATH``: the standard release, one folder or one ``.tar`` per WordNet synset
  (mixed is fine). Labels follow timm's fall11 list (``imagenet-22k``, 21,841 classes) whatever
  subset of synsets is present; an option ``imagenet21k:PATH,synsets=imagenet-21k-goog`` picks another list.
* ``imagenet1k:PATH``: ``PATH/train/<synset>/`` (folders or tars) and ``PATH/val/``, either synset
  folders or a flat folder labelled by ``LOC_val_solution.csv`` (Kaggle/ILSVRC) or ``labels.txt``
  (``filename synset`` per line) in ``PATH/val`` or ``PATH``. Labels follow timm's 1K list.
* ``digits[:size=32]`` and ``digits21k[:rotations=4,size=32]``: see ``pipeline.data.digits``.

A *unit* is the listing grain (a class folder, a tar, a chunk of a flat folder, a digit): the
scan of units runs in parallel on Ray. Scanning reads every file once to hash it, which finds
duplicates before anything is written (a duplicate can only be dropped before its shard exists).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import digits as digits_mod
from pipeline.data import synsets as synsets_mod

FLAT_CHUNK = 1000
IMAGE_FIELDS = ("key", "split", "label", "synset", "kind", "path", "offset", "size", "index", "rotation",
                "group", "sha256", "error_kind", "error")


class SourceError(ValueError):
    """The source spec is invalid, or the source is missing or empty: fix it before any work."""


@dataclass(frozen=True)
class Source:
    spec: str  # normalised spec, part of the config hash
    kind: str
    path: str
    classes: tuple[str, ...]
    options: dict = field(default_factory=dict, hash=False, compare=False)
    parent_classes: tuple[str, ...] | None = None
    parent_map: tuple[int, ...] | None = None

    def label_of(self, synset: str) -> int:
        return self._index().get(synset, -1)

    def _index(self) -> dict[str, int]:
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {s: i for i, s in enumerate(self.classes)}
            object.__setattr__(self, "_idx", idx)
        return idx


def _parse_options(text: str) -> dict[str, str]:
    opts = {}
    for part in filter(None, text.split(",")):
        k, sep, v = part.partition("=")
        if not sep:
            raise SourceError(f"bad source option {part!r}: expected key=value")
        opts[k.strip()] = v.strip()
    return opts


def parse_source(spec: str) -> Source:
    """Validate ``spec`` and read its class list (cheap: no file is opened)."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("digits", "digits21k"):
        opts = _parse_options(rest)
        allowed = {"size"} | ({"rotations"} if kind == "digits21k" else set())
        if set(opts) - allowed:
            raise SourceError(f"unknown option(s) {sorted(set(opts) - allowed)} for {kind}; allowed: {sorted(allowed)}")
        size = int(opts.get("size", digits_mod.DEFAULT_SIZE))
        if not 8 <= size <= 1024:
            raise SourceError(f"digits size must be in [8, 1024], got {size}")
        if kind == "digits":
            return Source(f"digits:size={size}", kind, "", tuple(digits_mod.class_names()), {"size": size})
        rotations = int(opts.get("rotations", digits_mod.DEFAULT_ROTATIONS))
        if not 1 <= rotations <= 4:
            raise SourceError(f"digits21k rotations must be 1..4 (quarter turns), got {rotations}")
        return Source(
            f"digits21k:rotations={rotations},size={size}", kind, "",
            tuple(digits_mod.class_names(rotations)), {"size": size, "rotations": rotations},
            parent_classes=tuple(digits_mod.class_names()), parent_map=tuple(digits_mod.parent_map(rotations)),
        )
    if kind not in ("imagefolder", "imagenet21k", "imagenet1k"):
        raise SourceError(
            f"unknown source {spec!r}: use imagefolder:PATH, imagenet21k:PATH, imagenet1k:PATH, digits or digits21k"
        )
    path_text, _, opt_text = rest.partition(",")
    opts = _parse_options(opt_text)
    if not path_text:
        raise SourceError(f"{kind} needs a path: {kind}:PATH")
    root = Path(path_text).expanduser()
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist or is not a directory")
    path = str(root.resolve())
    if kind == "imagefolder":
        if opts:
            raise SourceError(f"imagefolder takes no options, got {sorted(opts)}")
        base = root / "train" if (root / "train").is_dir() else root
        names = set(_class_entries(base))
        if (root / "train").is_dir() and (root / "val").is_dir():
            names |= set(_class_entries(root / "val"))
        if not names:
            raise SourceError(f"source folder {base} has no class folders: expected {base}/<class>/<image>")
        return Source(f"imagefolder:{path}", kind, path, tuple(sorted(names)))
    subset = opts.pop("synsets", synsets_mod.IN21K_SUBSET if kind == "imagenet21k" else synsets_mod.IN1K_SUBSET)
    if opts:
        raise SourceError(f"unknown option(s) {sorted(opts)} for {kind}; allowed: ['synsets']")
    try:
        classes = synsets_mod.synsets(subset)
    except AssertionError:
        raise SourceError(f"unknown timm ImageNet subset {subset!r}") from None
    base = root / "train" if kind == "imagenet1k" else root
    if kind == "imagenet1k" and not base.is_dir():
        raise SourceError(f"imagenet1k source needs {base}/<synset>/ folders or tars")
    if not _class_entries(base):
        raise SourceError(f"source folder {base} has no synset folders or tars")
    suffix = "" if subset == (synsets_mod.IN21K_SUBSET if kind == "imagenet21k" else synsets_mod.IN1K_SUBSET) else f",synsets={subset}"
    return Source(f"{kind}:{path}{suffix}", kind, path, classes, {"synsets": subset})


def _class_entries(base: Path) -> dict[str, Path]:
    """Class name -> folder or tar under ``base`` (hidden entries skipped)."""
    out: dict[str, Path] = {}
    if not base.is_dir():
        return out
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            out[entry.name] = Path(entry.path)
        elif entry.name.endswith(".tar") and entry.is_file():
            out[entry.name[: -len(".tar")]] = Path(entry.path)
    return out


def _val_labels(root: Path) -> dict[str, str] | None:
    """filename stem -> synset, from a labels file for a flat val folder."""
    for folder in (root / "val", root):
        loc = folder / "LOC_val_solution.csv"
        if loc.is_file():
            with open(loc, newline="") as f:
                return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
        txt = folder / "labels.txt"
        if txt.is_file():
            pairs = (line.split() for line in txt.read_text().splitlines() if line.strip())
            return {Path(p[0]).stem: p[1] for p in pairs}
    return None


def list_units(source: Source) -> list[dict]:
    """The listing grains of ``source``, as JSON-able dicts (the rows of the scan dataset)."""
    if source.kind in ("digits", "digits21k"):
        rotations = source.options.get("rotations")
        return [{"unit": "digits", "digit": d, "rotations": rotations or 0, "size": source.options["size"]}
                for d in range(digits_mod.NUM_DIGITS)]
    root = Path(source.path)
    splits = [("train", root / "train"), ("val", root / "val")] if (root / "train").is_dir() else [("train", root)]
    units: list[dict] = []
    for split, base in splits:
        entries = _class_entries(base)
        flat_files = [p for p in sorted(base.iterdir()) if p.is_file() and not p.name.startswith(".")
                      and not p.name.endswith(".tar")] if base.is_dir() else []
        if split == "val" and source.kind == "imagenet1k" and flat_files and not entries:
            labels = _val_labels(root)
            if labels is None:
                raise SourceError(f"{base} is a flat folder but no LOC_val_solution.csv or labels.txt labels it")
            for i in range(0, len(flat_files), FLAT_CHUNK):
                units.append({"unit": "flat", "split": split, "base": str(base),
                              "files": json.dumps([[p.name, labels.get(p.stem, "")] for p in flat_files[i:i + FLAT_CHUNK]])})
            continue
        for name, path in entries.items():
            units.append({"unit": "tar" if path.is_file() else "dir", "split": split, "base": str(base),
                          "synset": name, "path": str(path)})
    return units


def _row(**kw) -> dict:
    row = {"key": "", "split": "train", "label": -1, "synset": "", "kind": "file", "path": "", "offset": -1,
           "size": -1, "index": -1, "rotation": -1, "group": "", "sha256": "", "error_kind": "", "error": ""}
    row.update(kw)
    if not row["group"]:
        row["group"] = row["key"]
    return row


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _hash_file(path: str) -> tuple[int, str, str, str]:
    """(size, sha256, error_kind, error) of a file, without raising."""
    try:
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
        if size == 0:
            return 0, "", "empty_file", "zero bytes"
        return size, h.hexdigest(), "", ""
    except OSError as e:
        return -1, "", "unreadable", f"{type(e).__name__}: {e.strerror or e}"


def scan_unit(unit: dict, source: Source) -> list[dict]:
    """Every item of one unit, with size, content hash and any read error (never raises on bad files)."""
    kind = unit["unit"]
    if kind == "digits":
        rotations = unit["rotations"] or None
        rows = []
        for index in range(digits_mod.num_samples()):
            if digits_mod.digit_of(index) != unit["digit"]:
                continue
            for rot in range(rotations or 1):
                data = digits_mod.render(index, rot, unit["size"])
                rows.append(_row(key=digits_mod.sample_key(index, rot, rotations), split=digits_mod.split_of(index),
                                 label=digits_mod.label_of(index, rot, rotations),
                                 synset=source.classes[digits_mod.label_of(index, rot, rotations)],
                                 kind="digits", index=index, rotation=rot, size=len(data),
                                 sha256=hashlib.sha256(data).hexdigest(), group=f"digits/{index:04d}"))
        return rows
    split = unit["split"]
    if kind == "flat":
        rows = []
        for name, synset in json.loads(unit["files"]):
            path = os.path.join(unit["base"], name)
            size, digest, ek, err = _hash_file(path)
            label = source.label_of(synset) if synset else -1
            if not ek and label < 0:
                ek, err = "unknown_class", f"no label for {name} in the labels file" if not synset else f"synset {synset} not in the class list"
            rows.append(_row(key=f"{split}/{name}", split=split, label=label, synset=synset, path=path, size=size,
                             sha256=digest, error_kind=ek, error=err))
        return rows
    synset = unit["synset"]
    label = source.label_of(synset)
    if label < 0:
        return [_row(key=f"{split}/{synset}", split=split, synset=synset, kind="class", path=unit["path"],
                     error_kind="unknown_class", error=f"{synset!r} is not in the class list ({source.kind})")]
    rows = []
    if kind == "dir":
        def walk_error(e: OSError) -> None:  # os.walk would otherwise skip an unreadable folder silently
            rows.append(_row(key=f"{split}/{synset}/{os.path.relpath(e.filename, unit['path'])}", split=split,
                             synset=synset, kind="class", path=str(e.filename), error_kind="unreadable",
                             error=f"unreadable folder: {type(e).__name__}: {e.strerror or e}"))

        for dirpath, dirnames, filenames in os.walk(unit["path"], onerror=walk_error):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, unit["path"]).replace(os.sep, "/")
                size, digest, ek, err = _hash_file(path)
                if not _utf8(rel):
                    ek, err, rel = "bad_name", "file name is not valid UTF-8", rel.encode("utf-8", "replace").decode()
                rows.append(_row(key=f"{split}/{synset}/{rel}", split=split, label=label, synset=synset,
                                 path=path.encode("utf-8", "replace").decode(), size=size, sha256=digest,
                                 error_kind=ek, error=err))
    else:
        try:
            with tarfile.open(unit["path"], "r:") as tar:
                for member in tar:
                    if not member.isfile() or os.path.basename(member.name).startswith("."):
                        continue
                    data = tar.extractfile(member).read()
                    ek, err = ("empty_file", "zero bytes") if not data else ("", "")
                    rows.append(_row(key=f"{split}/{synset}/{member.name.lstrip('./')}", split=split, label=label,
                                     synset=synset, kind="tar", path=unit["path"], offset=member.offset_data,
                                     size=len(data), sha256=hashlib.sha256(data).hexdigest() if data else "",
                                     error_kind=ek, error=err))
        except (OSError, tarfile.TarError) as e:
            return [_row(key=f"{split}/{synset}", split=split, synset=synset, kind="class", path=unit["path"],
                         error_kind="unreadable", error=f"unreadable tar: {type(e).__name__}: {e}")] + rows
    if not rows:
        rows.append(_row(key=f"{split}/{synset}", split=split, label=label, synset=synset, kind="class",
                         path=unit["path"], error_kind="empty_class", error="class folder/tar has no files"))
    return rows


def read_item(row: dict, render_size: int = digits_mod.DEFAULT_SIZE) -> bytes:
    """The encoded bytes of one scanned item (raises OSError when it became unreadable)."""
    kind = row["kind"]
    if kind == "digits":
        return digits_mod.render(int(row["index"]), int(row["rotation"]), render_size)
    if kind == "tar":
        with open(row["path"], "rb") as f:
            f.seek(int(row["offset"]))
            return f.read(int(row["size"]))
    with open(row["path"], "rb") as f:
        return f.read()
