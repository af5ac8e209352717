"""``digits[:size=32]`` and ``digits21k[:rotations=4,size=32]``: scikit-learn's digits, rendered by the workers.

The images are made where they are read (``pipeline.data.digits.render``), so these sources need
no shared filesystem on a cluster. One unit per (split, digit); see ``pipeline.data.digits`` for
the two label spaces and the fixed val split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.data import digits as digits_mod
from pipeline.data.sources.base import Item, Source, Unit, digest, int_option, parse_options, register


@register
@dataclass(frozen=True)
class Digits(Source):
    kind = "digits"
    usage = "digits[:size=32]"
    rank = 20

    size: int = digits_mod.DEFAULT_SIZE
    rotations: int | None = None  # None: the 10-class label space

    @classmethod
    def parse(cls, rest: str) -> Digits:
        opts = parse_options(rest, {"size"}, cls.kind)
        size = int_option(opts, "size", digits_mod.DEFAULT_SIZE, 8, 1024, cls.kind)
        return cls(f"digits:size={size}", tuple(digits_mod.class_names()), size=size)

    def _indices(self, unit: Unit) -> list[int]:
        digit = unit.params[0]
        return [i for i in range(digits_mod.num_samples())
                if digits_mod.digit_of(i) == digit and digits_mod.split_of(i) == unit.split]

    def list_units(self) -> list[Unit]:
        units = []
        per = self.rotations or 1
        for split in ("train", "val"):
            for d in range(digits_mod.NUM_DIGITS):
                unit = Unit(f"{split}/{d}", split, "", params=(d,))
                n = len(self._indices(unit)) * per
                units.append(Unit(unit.id, split, "", n=n, digest=digest(self.spec, split, d, n), params=(d,)))
        return units

    def read(self, unit: Unit) -> Iterator[Item]:
        rotations = self.rotations
        pairs = [(i, r) for i in self._indices(unit) for r in range(rotations or 1)]
        for index, rot in pairs[unit.start:unit.stop]:
            label = digits_mod.label_of(index, rot, rotations)
            yield Item(digits_mod.sample_key(index, rot, rotations), label, self.classes[label],
                       f"digits/{index:04d}", digits_mod.render(index, rot, self.size), group=f"digits/{index:04d}")


@register
@dataclass(frozen=True)
class Digits21k(Digits):
    kind = "digits21k"
    usage = "digits21k[:rotations=4,size=32]"
    rank = 21

    @classmethod
    def parse(cls, rest: str) -> Digits21k:
        opts = parse_options(rest, {"size", "rotations"}, cls.kind)
        size = int_option(opts, "size", digits_mod.DEFAULT_SIZE, 8, 1024, cls.kind)
        rotations = int_option(opts, "rotations", digits_mod.DEFAULT_ROTATIONS, 1, 4, f"{cls.kind} (quarter turns)")
        return cls(f"digits21k:rotations={rotations},size={size}", tuple(digits_mod.class_names(rotations)),
                   parent_classes=tuple(digits_mod.class_names()),
                   parent_map=tuple(digits_mod.parent_map(rotations)), size=size, rotations=rotations)
