"""``synthetic:n=N,classes=C[,size=8,dup_every=K,bad_every=K]``: a benchmark and test source, not data.

Workers generate ``N`` tiny distinct JPEGs (a flat colour per class, made unique by a JPEG comment
holding the image's index), so sharding can be measured at millions of images without a disk or a
network being the limit (``benchmarks/shard_scale.py``). Image ``i`` is in class ``i % C``; every
``dup_every``-th image repeats the bytes of the one before it (which is in another class: duplicates
across units), every ``bad_every``-th is not an image at all. Everything is train (minival is
carved out as for any source).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from pipeline.data.sources.base import (
    Item,
    Source,
    SourceError,
    Unit,
    digest,
    int_option,
    parse_options,
    register,
)


@functools.cache
def _base_jpeg(cls: int, size: int) -> bytes:
    colour = ((cls * 97) % 256, (cls * 57 + 80) % 256, (cls * 31 + 160) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _image(index: int, classes: int, size: int) -> bytes:
    base = _base_jpeg(index % classes, size)
    payload = f"synthetic {index}".encode()
    # A COM segment right after SOI: a valid JPEG whose bytes (and hash) are unique to the index.
    return base[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + base[2:]


@register
@dataclass(frozen=True)
class Synthetic(Source):
    kind = "synthetic"
    usage = "synthetic:n=N,classes=C[,size=8,dup_every=K,bad_every=K] (benchmarks and tests)"
    rank = 90

    n: int = 0
    size: int = 8
    dup_every: int = 0
    bad_every: int = 0

    @classmethod
    def parse(cls, rest: str) -> Synthetic:
        opts = parse_options(rest, {"n", "classes", "size", "dup_every", "bad_every"}, cls.kind)
        if "n" not in opts or "classes" not in opts:
            raise SourceError(f"synthetic needs n= and classes=, e.g. synthetic:n=100000,classes=1000; got {rest!r}")
        n = int_option(opts, "n", 0, 1, 10**9, cls.kind)
        classes = int_option(opts, "classes", 0, 1, 10**6, cls.kind)
        size = int_option(opts, "size", 8, 8, 512, cls.kind)
        dup = int_option(opts, "dup_every", 0, 0, 10**9, cls.kind)
        bad = int_option(opts, "bad_every", 0, 0, 10**9, cls.kind)
        if dup == 1 or bad == 1:
            raise SourceError("synthetic dup_every and bad_every must be 0 (off) or at least 2")
        spec = f"synthetic:n={n},classes={classes},size={size}"
        spec += (f",dup_every={dup}" if dup else "") + (f",bad_every={bad}" if bad else "")
        return cls(spec, tuple(f"c{c:06d}" for c in range(classes)), n=n, size=size, dup_every=dup, bad_every=bad)

    def list_units(self) -> list[Unit]:
        c = len(self.classes)
        return [Unit(f"train/{name}", "train", name, n=len(range(k, self.n, c)),
                     digest=digest(self.spec, k), params=(k,))
                for k, name in enumerate(self.classes)]

    def data(self, index: int) -> bytes:
        if self.bad_every and index % self.bad_every == self.bad_every // 2:
            return b"synthetic bad input %d" % index
        if self.dup_every and index and index % self.dup_every == self.dup_every - 1:
            return self.data(index - 1)
        return _image(index, len(self.classes), self.size)

    def read(self, unit: Unit) -> Iterator[Item]:
        k = unit.params[0]
        for index in range(k, self.n, len(self.classes))[unit.start:unit.stop]:
            key = f"train/{unit.name}/{index:09d}"
            yield Item(key, k, unit.name, "synthetic", self.data(index))
