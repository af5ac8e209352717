"""The bundled dataset of the demo and the tests: scikit-learn's real handwritten digits.

Two label spaces are built from the same 1,797 handwriting samples, so that pretraining
and fine-tuning differ exactly as ImageNet-21K and ImageNet-1K do:

* ``digits``: 10 classes, ``"0"`` .. ``"9"``.
* ``digits21k``: every digit under ``rotations`` fixed rotations (default 4: 0, 90, 180, 270
  degrees) as separate classes, ``"<digit>_r<degrees>"``, label ``digit * rotations + k``.
  ``parent_map(rotations)[label] == digit`` is its fine-tuning class, the analogue of
  ``synsets.in1k_to_in21k_indices``: a 10-class head starts from rows
  ``[d * rotations for d in range(10)]`` (the upright classes) of the larger head.

The val split is a fixed 20% of the *samples* (stratified by digit, chosen by a salted hash
that does not depend on any seed), shared by both label spaces: every rotation of a val
sample is val in ``digits21k`` and its upright image is val in ``digits``, so no handwriting
sample seen in pretraining train is used to evaluate the fine-tuned model.

Images are rendered from the 8x8 originals (16 grey levels) to ``size`` x ``size`` RGB PNG
(bicubic upscaling); rotations are exact (``numpy.rot90``) so no interpolation leaks across classes.
"""

from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

NUM_DIGITS = 10
DEFAULT_SIZE = 32
DEFAULT_ROTATIONS = 4
VAL_FRACTION = 0.2
_VAL_SALT = "coatnet-digits-val-v1"


@functools.cache
def _images() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


def num_samples() -> int:
    return len(_images()[1])


def digit_of(index: int) -> int:
    return int(_images()[1][index])


def class_names(rotations: int | None = None) -> list[str]:
    """Label order: ``"0".."9"``, or ``"<d>_r<deg>"`` digit-major when ``rotations`` is given."""
    if rotations is None:
        return [str(d) for d in range(NUM_DIGITS)]
    return [f"{d}_r{k * 90:03d}" for d in range(NUM_DIGITS) for k in range(rotations)]


def parent_map(rotations: int) -> list[int]:
    """For each ``digits21k`` label, its ``digits`` label (the digit)."""
    return [label // rotations for label in range(NUM_DIGITS * rotations)]


@functools.cache
def val_indices() -> frozenset[int]:
    """The held-out handwriting samples (same for every seed and both label spaces)."""
    _, target = _images()
    chosen: set[int] = set()
    for d in range(NUM_DIGITS):
        idx = [int(i) for i in np.flatnonzero(target == d)]
        idx.sort(key=lambda i: hashlib.sha256(f"{_VAL_SALT}:{i}".encode()).hexdigest())
        chosen.update(idx[: round(VAL_FRACTION * len(idx))])
    return frozenset(chosen)


def split_of(index: int) -> str:
    return "val" if index in val_indices() else "train"


def render(index: int, rotation: int = 0, size: int = DEFAULT_SIZE) -> bytes:
    """Sample ``index`` rotated by ``rotation`` quarter turns, as ``size`` x ``size`` RGB PNG bytes."""
    img = np.rot90(_images()[0][index], rotation)
    pil = Image.fromarray(np.ascontiguousarray(img), mode="L")
    if size != img.shape[0]:
        pil = pil.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def label_of(index: int, rotation: int, rotations: int | None) -> int:
    d = digit_of(index)
    return d if rotations is None else d * rotations + rotation


def sample_key(index: int, rotation: int, rotations: int | None) -> str:
    """Stable key: the class, the handwriting sample, and (21K-shaped) the rotation."""
    name = class_names(rotations)[label_of(index, rotation, rotations)]
    return f"{split_of(index)}/{name}/{index:04d}"


def write_digits(
    out_dir: str | Path, *, size: int = DEFAULT_SIZE, rotations: int | None = None
) -> Path:
    """Write the digits as an image folder: ``{out}/{train,val}/{class}/{index:04d}.png``.

    ``rotations=None`` writes the 10-class label space, an integer the 21K-shaped one. The
    folder is a valid ``imagefolder:`` source (class folders under ``train/`` and ``val/``);
    ``shard_dataset("digits")`` renders the same images in its workers instead, so that it
    needs no shared filesystem on a cluster.
    """
    out = Path(out_dir)
    names = class_names(rotations)
    for index in range(num_samples()):
        for rot in range(rotations or 1):
            label = label_of(index, rot, rotations)
            path = out / split_of(index) / names[label] / f"{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(render(index, rot, size))
    return out
