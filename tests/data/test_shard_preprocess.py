"""Per-image preprocessing: every mode to RGB, EXIF orientation, bounded shorter side, bad inputs named."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from shard_helpers import encode, make_image

from pipeline.data.preprocess import BadInput, preprocess


def _decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
                                      ("I;16", "PNG"), ("LA", "PNG"), ("1", "PNG"), ("RGB", "WEBP")])
def test_every_mode_becomes_rgb(mode, fmt):
    src = make_image(1, (50, 40))
    img = src.convert("I;16") if mode == "I;16" else src.convert(mode)
    out = preprocess(encode(img, fmt), max_side=320)
    assert not out.kept_original
    dec = _decoded(out.data)
    assert dec.mode == "RGB" and dec.format == "JPEG" and dec.size == (50, 40)


def test_sixteen_bit_keeps_its_range():
    import numpy as np

    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = preprocess(encode(img, "PNG"))
    dec = np.asarray(_decoded(out.data))
    assert dec.max() > 200 and dec.min() < 30  # not clipped to white as convert("RGB") would


def test_shorter_side_bounded_and_small_images_kept_byte_for_byte():
    big = encode(make_image(2, (900, 600)), "JPEG")
    out = preprocess(big, max_side=320)
    assert (out.width, out.height) == (480, 320) and _decoded(out.data).size == (480, 320)
    small = encode(make_image(3, (300, 200)), "JPEG")
    kept = preprocess(small, max_side=320)
    assert kept.kept_original and kept.data == small


def test_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(make_image(4, (60, 30)), "JPEG", exif=exif)
    out = preprocess(data, max_side=320)
    assert not out.kept_original and _decoded(out.data).size == (30, 60)


def test_bad_inputs_are_named():
    good = encode(make_image(5, (64, 64)), "JPEG")
    cases = {
        "empty_file": b"",
        "not_image": b"this is a text file, not a picture",
        "truncated": good[: len(good) // 2],
    }
    for kind, data in cases.items():
        with pytest.raises(BadInput) as e:
            preprocess(data)
        assert e.value.kind == kind
    with pytest.raises(BadInput) as e:
        preprocess(encode(Image.new("L", (1000, 1000)), "PNG"), max_pixels=250_000)
    assert e.value.kind == "too_many_pixels" and "1000x1000" in e.value.reason
