"""Image transforms from torchvision.transforms.v2: training augmentation, evaluation crop, MixUp/CutMix.

The loader applies the PIL stages (``train_augment``, ``eval_resize``) in its workers and sends the result
as uint8 pixels (``to_uint8_hwc``); scaling, normalisation and MixUp/CutMix run on the device after the copy
(``pipeline.train.device_input``). ``train_transform`` / ``eval_transform`` are the same stages followed by
torchvision's float conversion and normalisation on the CPU: the reference the device path must equal, and
what the registered model's preprocessing (``pipeline.evaluate.preprocessing``) mirrors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from pipeline.train.config import AugmentConfig, EvalConfig

_INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def augment_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, epoch, sample ids): FNV-1a, stable across processes (unlike hash())."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _to_float(aug: AugmentConfig) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.mean, aug.std)]


def to_uint8_hwc(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> its pixels as a uint8 (H, W, 3) tensor (PIL's own layout: no transpose)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def train_augment(aug: AugmentConfig, img_size: int) -> Callable[[Image.Image], Image.Image]:
    """PIL image -> PIL image: random resized crop, flip, RandAugment(n, m); draws from torch's default generator."""
    ops: list = [
        v2.RandomResizedCrop(img_size, scale=aug.crop_scale, ratio=aug.crop_ratio,
                             interpolation=_INTERP[aug.interpolation], antialias=True),
    ]
    if aug.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.randaugment is not None:
        ops.append(v2.RandAugment(num_ops=aug.randaugment.num_ops, magnitude=aug.randaugment.magnitude,
                                  interpolation=InterpolationMode.BILINEAR))
    return v2.Compose(ops)


def eval_resize(aug: AugmentConfig, ev: EvalConfig, img_size: int) -> Callable[[Image.Image], Image.Image]:
    """PIL image -> PIL image: the short side to img_size / crop_pct and a center crop, or straight to img_size."""
    interp = _INTERP[aug.interpolation]
    if ev.center_crop:
        resize = int(round(img_size / ev.crop_pct))
        return v2.Compose([v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop(img_size)])
    return v2.Compose([v2.Resize((img_size, img_size), interpolation=interp, antialias=True)])


def train_transform(aug: AugmentConfig, img_size: int) -> Callable:
    """PIL image -> normalised float32 (3, H, W) tensor on the CPU: ``train_augment``, then torchvision's
    ToImage, ToDtype(scale=True), Normalize (the same draws as ``train_augment``)."""
    return v2.Compose([train_augment(aug, img_size), *_to_float(aug)])


def eval_transform(aug: AugmentConfig, ev: EvalConfig, img_size: int) -> Callable:
    """PIL image -> normalised float32 (3, H, W) tensor on the CPU: ``eval_resize``, then the float conversion."""
    return v2.Compose([eval_resize(aug, ev, img_size), *_to_float(aug)])


def batch_mix(aug: AugmentConfig, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix on a normalised float batch (one of the two chosen per batch when both are on)."""
    return _mixes(float(aug.mixup_alpha), float(aug.cutmix_alpha), int(num_classes))


@functools.lru_cache(maxsize=16)
def _mixes(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Callable | None:
    # Cached: the trainer asks once per micro-batch; the transforms hold no state.
    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
