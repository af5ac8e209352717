"""Per-image preprocessing: decode, EXIF orientation, any mode to RGB, bounded shorter side, JPEG.

One pure function, ``preprocess``, used by the Ray workers and by the single-process
baseline of the benchmark alike. Bad input raises ``BadInput`` with a short ``kind`` and a
human reason; the caller quarantines it and goes on.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Truncated files must fail, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (1024 * 1024 * 1024 // 4 // 3)
_KEEP_FORMATS = {"JPEG", "PNG"}


class BadInput(Exception):
    """An input that cannot become a sample; ``kind`` is one of the quarantine categories."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Processed:
    data: bytes
    width: int
    height: int
    kept_original: bool


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("RGB") clips 16-bit/32-bit values at 255; rescale the range instead.
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((a - lo) * scale).round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on white: dropping alpha would expose whatever colour sits under transparent pixels.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the shorter side at most ``max_side``, aspect ratio kept."""
    short = min(width, height)
    if short <= max_side:
        return width, height
    scale = max_side / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def preprocess(
    data: bytes, *, max_side: int = 320, jpeg_quality: int = 90, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Processed:
    if not data:
        raise BadInput("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadInput("not_image", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput("too_many_pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the file
        raise BadInput("corrupt", f"{type(e).__name__}: {e}") from None
    fmt = img.format
    width, height = img.size
    if width * height > max_pixels:
        raise BadInput("too_many_pixels", f"{width}x{height} = {width * height} pixels > limit {max_pixels}")
    stored_size = target_size(width, height, max_side)
    try:
        if fmt == "JPEG" and stored_size != (width, height):
            # DCT-domain downscaling while decoding: much faster, and never below the requested size.
            img.draft("RGB", stored_size)
        img.load()
        orientation = img.getexif().get(0x0112, 1) or 1
        # Orientations 5-8 swap width and height.
        final_size = stored_size if orientation < 5 else stored_size[::-1]
        if fmt in _KEEP_FORMATS and img.mode == "RGB" and orientation == 1 and final_size == (width, height):
            return Processed(data, width, height, kept_original=True)
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        if img.size != final_size:
            img = img.resize(final_size, Image.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=jpeg_quality)
    except OSError as e:
        raise BadInput("truncated", f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - as above
        raise BadInput("corrupt", f"{type(e).__name__}: {e}") from None
    return Processed(buf.getvalue(), img.size[0], img.size[1], kept_original=False)
