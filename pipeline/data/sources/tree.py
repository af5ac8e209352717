"""Image trees on a local or shared disk, or in a bucket: ``imagefolder:``, ``imagenet21k:``, ``imagenet1k:``.

* ``imagefolder:ROOT``: one folder (or ``.tar``) per class; names sorted give the labels. If
  ``ROOT/train`` exists, classes are read from ``ROOT/train`` and, when present, ``ROOT/val``.
* ``imagenet21k:ROOT``: the standard release, one folder or one ``.tar`` per WordNet synset (mixed is
  fine). Labels follow timm's fall11 list (``imagenet-22k``, 21,841 classes) whatever subset of synsets
  is present; ``imagenet21k:ROOT,synsets=imagenet-21k-goog`` picks another of timm's lists.
* ``imagenet1k:ROOT``: ``ROOT/train/<synset>/`` (folders or tars) and ``ROOT/val/``, either synset
  folders or a flat folder labelled by ``LOC_val_solution.csv`` (Kaggle/ILSVRC) or ``labels.txt``
  (``filename synset`` per line) in ``ROOT/val`` or ``ROOT``. Labels follow timm's 1K list.

``ROOT`` is a path or ``s3://bucket/prefix`` (``S3_ENDPOINT_URL`` and the usual AWS credentials apply).
Every read goes through ``pipeline.storage``: a tar is streamed with one GET and read member by member
(``tarfile`` stream mode: no seek, no second request); the files of an S3 class folder are fetched by
a few threads at once, in order, so that request latency does not idle the CPU.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from pipeline import storage
from pipeline.data import synsets as synsets_mod
from pipeline.data.sources.base import (
    Item,
    Source,
    SourceError,
    Unit,
    UnitProblem,
    digest,
    parse_options,
    register,
)

LABEL_FILES = ("LOC_val_solution.csv", "labels.txt")
FETCH_THREADS = 8  # concurrent GETs of one S3 class folder's files


class SourceChanged(SourceError):
    """The source changed between listing and reading (files added, removed or replaced)."""


def _hidden(name: str) -> bool:
    return PurePosixPath(name).name.startswith(".")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _normalise_root(text: str, kind: str) -> str:
    if not text:
        raise SourceError(f"{kind} needs a location: {kind}:PATH or {kind}:s3://bucket/prefix")
    if storage.is_remote(text):
        try:
            bucket, key = storage.split_s3(text)
        except ValueError as e:
            raise SourceError(f"{kind}: {e}") from None
        return f"s3://{bucket}/{key.strip('/')}".rstrip("/")
    return str(Path(text).expanduser().resolve())


def _has_objects(uri: str) -> bool:
    try:
        return storage.has_objects(uri)
    except Exception as e:  # noqa: BLE001 - translated when it is the user's to fix, else re-raised
        problem = storage.access_problem(e, uri)
        if problem is None:
            raise
        raise SourceError(problem) from None


def _check_exists(root: str) -> None:
    """Fail with one sentence when ``root`` is missing, empty or unreadable (one request on S3)."""
    if not _has_objects(root):
        if storage.is_remote(root):
            raise SourceError(f"source {root} does not exist or is empty: no object under that prefix")
        if not Path(root).is_dir():
            raise SourceError(f"source folder {root} does not exist or is not a directory")
        # An empty folder: the caller says what it expected inside.


def _list_dir(uri: str) -> storage.DirListing:
    try:
        return storage.list_dir(uri)
    except Exception as e:  # noqa: BLE001
        problem = storage.access_problem(e, uri)
        if problem is None:
            raise
        raise SourceError(problem) from None


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] if storage.is_remote(uri) else os.path.basename(uri)


@dataclass(frozen=True)
class Entry:
    name: str
    uri: str
    form: str  # "dir" | "tar"
    size: int = -1
    tag: str = ""


def class_entries(base: str) -> list[Entry]:
    """Class folders and ``<class>.tar`` files directly under ``base`` (hidden entries skipped), by name."""
    listing = _list_dir(base)
    entries = [Entry(d, storage.join(base, d), "dir") for d in listing.dirs if not _hidden(d)]
    for f in listing.files:
        name = _name(f.uri)
        if name.endswith(".tar") and not _hidden(name):
            entries.append(Entry(name[: -len(".tar")], f.uri, "tar", f.size, f.tag))
    return sorted(entries, key=lambda e: e.name)


def _flat_files(base: str) -> list[storage.ObjectInfo]:
    return [f for f in _list_dir(base).files
            if not _hidden(_name(f.uri)) and not _name(f.uri).endswith(".tar") and _name(f.uri) not in LABEL_FILES]


@functools.lru_cache(maxsize=8)
def val_labels(root: str) -> dict[str, str] | None:
    """filename stem -> synset, from a labels file for a flat val folder (read once per process)."""
    for folder in (storage.join(root, "val"), root):
        for name in LABEL_FILES:
            uri = storage.join(folder, name)
            if not storage.exists(uri):
                continue
            text = storage.read_text(uri)
            if name.endswith(".csv"):
                return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(io.StringIO(text))}
            pairs = (line.split() for line in text.splitlines() if line.strip())
            return {PurePosixPath(p[0]).stem: p[1] for p in pairs}
    return None


def _walk_local(top: str, problems: list[str]) -> list[tuple[str, storage.ObjectInfo]]:
    """(relative path, info) of every file under ``top``, sorted; unreadable folders go to ``problems``."""
    out = []

    def onerror(e: OSError) -> None:  # os.walk would otherwise skip an unreadable folder silently
        problems.append(f"unreadable folder {e.filename}: {type(e).__name__}: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(top, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
                info = storage.ObjectInfo(path, st.st_size, str(st.st_mtime_ns))
            except OSError:  # a dangling link: listed, and quarantined as unreadable when read
                info = storage.ObjectInfo(path, -1, "")
            out.append((os.path.relpath(path, top).replace(os.sep, "/"), info))
    return sorted(out, key=lambda t: t[0])


def _walk(top: str, problems: list[str]) -> list[tuple[str, storage.ObjectInfo]]:
    if not storage.is_remote(top):
        return _walk_local(top, problems)
    try:
        objs = list(storage.list_objects(top))
    except Exception as e:  # noqa: BLE001
        problem = storage.access_problem(e, top)
        if problem is None:
            raise
        raise SourceError(problem) from None
    prefix = top.rstrip("/") + "/"
    out = [(o.uri[len(prefix):], o) for o in objs]
    return [(rel, o) for rel, o in out if not any(part.startswith(".") for part in rel.split("/"))]


def _listing_digest(files: list[tuple[str, storage.ObjectInfo]]) -> str:
    return digest(*(f"{rel}:{o.size}:{o.tag}" for rel, o in files))


def _fetch_local(path: str) -> bytes | Exception:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return e


def _fetch_s3(uri: str) -> bytes | Exception:
    try:
        return storage.read_bytes(uri)
    except Exception as e:  # noqa: BLE001 - the reader decides what is fatal
        return e


def _fetch_all(uris: list[str]) -> Iterator[tuple[str, bytes | Exception]]:
    """Each file's bytes (or the exception reading it), in order; S3 objects fetched a few at a time."""
    if not uris or not storage.is_remote(uris[0]):
        for u in uris:
            yield u, _fetch_local(u)
        return
    window = 4 * FETCH_THREADS
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        for i in range(0, len(uris), window):
            chunk = uris[i:i + window]
            yield from zip(chunk, pool.map(_fetch_s3, chunk))


def _raise_if_fatal(e: Exception, uri: str) -> None:
    """A missing object means the source changed; an access problem is the user's; the rest is retried."""
    # lazy: botocore only once a remote store is used, as in pipeline.storage
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
        raise SourceChanged(f"{uri} disappeared while sharding: the source changed; re-run with --restart "
                            "once it is stable") from None
    problem = storage.access_problem(e, uri)
    if problem:
        raise SourceError(problem) from None
    raise e


@dataclass(frozen=True)
class TreeSource(Source):
    """Class folders or tars under ``root`` (``root/train`` + ``root/val`` when ``root/train`` exists)."""

    root: str = ""

    def splits(self) -> list[tuple[str, str]]:
        # Two one-request probes, not a listing of the root (which may hold 21K tars).
        train, val = storage.join(self.root, "train"), storage.join(self.root, "val")
        if _has_objects(train):
            return [("train", train)] + ([("val", val)] if _has_objects(val) else [])
        return [("train", self.root)]

    def list_units(self) -> list[Unit]:
        units = []
        for split, base in self.splits():
            entries = class_entries(base)
            if split == "val" and not entries and self.flat_val_allowed():
                if val_labels(self.root) is None and _flat_files(base):
                    raise SourceError(f"{base} is a flat folder but no LOC_val_solution.csv or labels.txt "
                                      f"(in {base} or {self.root}) labels it")
                units.append(Unit(f"{split}/*", split, "", base, "flat"))
                continue
            for e in entries:
                if e.form == "tar":
                    units.append(Unit(f"{split}/{e.name}", split, e.name, e.uri, "tar", -1, e.size,
                                      digest(e.size, e.tag)))
                else:
                    units.append(Unit(f"{split}/{e.name}", split, e.name, e.uri, "dir"))
        return units

    def flat_val_allowed(self) -> bool:
        return False

    def _files(self, unit: Unit, problems: list[str]) -> list[tuple[str, storage.ObjectInfo]]:
        if unit.form == "flat":
            return [(_name(o.uri), o) for o in _flat_files(unit.uri)]
        return _walk(unit.uri, problems)

    def describe(self, unit: Unit) -> Unit:
        if not unit.needs_description:
            return unit
        files = self._files(unit, [])
        return replace(unit, n=len(files), nbytes=sum(max(0, o.size) for _, o in files),
                       digest=_listing_digest(files))

    def read(self, unit: Unit) -> Iterator[Item | UnitProblem]:
        if unit.form == "tar":
            yield from self._read_tar(unit)
            return
        problems: list[str] = []
        files = self._files(unit, problems)
        if unit.digest and _listing_digest(files) != unit.digest:
            raise SourceChanged(f"{unit.uri} changed since it was listed (files added, removed or replaced); "
                                "re-run with --restart once the source is stable")
        first = unit.start == 0
        if first:
            for p in problems:
                yield UnitProblem(unit.id, unit.uri, "unreadable_class", p)
            if not files:
                yield UnitProblem(unit.id, unit.uri, "empty_class", "class folder has no files")
        files = files[unit.start:unit.stop]
        labels = val_labels(self.root) if unit.form == "flat" else None
        label = self.label_of(unit.name) if unit.name else -1
        for (rel, _), (uri, data) in zip(files, _fetch_all([o.uri for _, o in files])):
            if unit.form == "flat":
                synset = (labels or {}).get(PurePosixPath(rel).stem, "")
                label = self.label_of(synset) if synset else -1
                key = f"{unit.split}/{rel}"
            else:
                synset, key = unit.name, f"{unit.split}/{unit.name}/{rel}"
            path = uri.encode("utf-8", "replace").decode()
            if isinstance(data, Exception):
                if storage.is_remote(uri):
                    _raise_if_fatal(data, uri)
                yield Item(key.encode("utf-8", "replace").decode(), label, synset, path, None, error_kind="unreadable",
                           error=f"{type(data).__name__}: {getattr(data, 'strerror', None) or data}")
                continue
            item = Item(key, label, synset, path, data)
            if not _utf8(rel):
                item = Item(key.encode("utf-8", "replace").decode(), label, synset, path, None,
                            error_kind="bad_name", error="file name is not valid UTF-8")
            elif unit.form == "flat" and label < 0:
                item.data, item.error_kind = None, "unlabelled"
                item.error = (f"no label for {rel} in the labels file" if not synset
                              else f"synset {synset} not in the class list")
            yield item

    def _read_tar(self, unit: Unit) -> Iterator[Item | UnitProblem]:
        label = self.label_of(unit.name)
        members = 0
        try:
            with storage.open_stream(unit.uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isfile() or _hidden(member.name):
                        continue
                    data = tar.extractfile(member).read()
                    members += 1
                    name = member.name.removeprefix("./")
                    key = f"{unit.split}/{unit.name}/{name}"
                    if not _utf8(name):
                        yield Item(key.encode("utf-8", "replace").decode(), label, unit.name, unit.uri, None,
                                   error_kind="bad_name", error="member name is not valid UTF-8")
                    else:
                        yield Item(key, label, unit.name, unit.uri, data)
        except (tarfile.TarError, EOFError) as e:
            yield UnitProblem(unit.id, unit.uri, "unreadable_class",
                              f"unreadable tar after {members} member(s): {type(e).__name__}: {e}")
            return
        except OSError as e:
            if storage.is_remote(unit.uri):
                raise
            yield UnitProblem(unit.id, unit.uri, "unreadable_class", f"unreadable tar: {type(e).__name__}: {e}")
            return
        except Exception as e:  # noqa: BLE001 - S3: fatal problems become sentences, the rest is retried
            _raise_if_fatal(e, unit.uri)
        if not members:
            yield UnitProblem(unit.id, unit.uri, "empty_class", "class tar has no files")


@register
@dataclass(frozen=True)
class ImageFolder(TreeSource):
    kind = "imagefolder"
    usage = "imagefolder:PATH|s3://bucket/prefix"
    rank = 10

    @classmethod
    def parse(cls, rest: str) -> ImageFolder:
        path_text, _, opt_text = rest.partition(",")
        parse_options(opt_text, set(), cls.kind)
        root = _normalise_root(path_text, cls.kind)
        _check_exists(root)
        probe = cls(f"{cls.kind}:{root}", (), root=root)
        names = {e.name for _, base in probe.splits() for e in class_entries(base)}
        if not names:
            base = probe.splits()[0][1]
            raise SourceError(f"source {base} has no class folders: expected {base}/<class>/<image> "
                              f"or {base}/<class>.tar")
        return cls(f"{cls.kind}:{root}", tuple(sorted(names)), root=root)


@dataclass(frozen=True)
class _ImageNet(TreeSource):
    default_subset = ""
    synsets: str = ""

    @classmethod
    def parse(cls, rest: str) -> _ImageNet:
        path_text, _, opt_text = rest.partition(",")
        opts = parse_options(opt_text, {"synsets"}, cls.kind)
        root = _normalise_root(path_text, cls.kind)
        subset = opts.get("synsets", cls.default_subset)
        try:
            classes = synsets_mod.synsets(subset)
        except AssertionError:
            raise SourceError(f"unknown timm ImageNet subset {subset!r} (e.g. imagenet-22k, imagenet-21k-goog, "
                              "imagenet-1k)") from None
        _check_exists(cls.required_folder(root))
        suffix = "" if subset == cls.default_subset else f",synsets={subset}"
        return cls(f"{cls.kind}:{root}{suffix}", classes, root=root, synsets=subset)

    @classmethod
    def required_folder(cls, root: str) -> str:
        return root


@register
@dataclass(frozen=True)
class ImageNet21k(_ImageNet):
    kind = "imagenet21k"
    usage = "imagenet21k:PATH|s3://bucket/prefix[,synsets=SUBSET]"
    rank = 11
    default_subset = synsets_mod.IN21K_SUBSET


@register
@dataclass(frozen=True)
class ImageNet1k(_ImageNet):
    kind = "imagenet1k"
    usage = "imagenet1k:PATH|s3://bucket/prefix"
    rank = 12
    default_subset = synsets_mod.IN1K_SUBSET

    @classmethod
    def required_folder(cls, root: str) -> str:
        train = storage.join(root, "train")
        if not _has_objects(train):
            _check_exists(root)  # a missing root says so; a root without train/ gets the layout it needs
            raise SourceError(f"imagenet1k source needs {train}/<synset>/ folders or tars")
        return train

    def flat_val_allowed(self) -> bool:
        return True
