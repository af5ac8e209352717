"""Image transforms from torchvision.transforms.v2: training augmentation, evaluation crop, MixUp/CutMix."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode, v2

from pipeline.train.config import AugmentConfig, EvalConfig

_INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def _to_tensor(aug: AugmentConfig) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.mean, aug.std)]


def train_transform(aug: AugmentConfig, img_size: int) -> Callable:
    """PIL image -> normalised float tensor: random resized crop, flip, RandAugment(n, m)."""
    ops: list = [
        v2.RandomResizedCrop(img_size, scale=aug.crop_scale, ratio=aug.crop_ratio,
                             interpolation=_INTERP[aug.interpolation], antialias=True),
    ]
    if aug.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.randaugment is not None:
        ops.append(v2.RandAugment(num_ops=aug.randaugment.num_ops, magnitude=aug.randaugment.magnitude,
                                  interpolation=InterpolationMode.BILINEAR))
    return v2.Compose(ops + _to_tensor(aug))


def eval_transform(aug: AugmentConfig, ev: EvalConfig, img_size: int) -> Callable:
    """Resize the short side to img_size / crop_pct and center-crop, or resize straight to img_size."""
    interp = _INTERP[aug.interpolation]
    if ev.center_crop:
        resize = int(round(img_size / ev.crop_pct))
        ops: list = [v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop(img_size)]
    else:
        ops = [v2.Resize((img_size, img_size), interpolation=interp, antialias=True)]
    return v2.Compose(ops + _to_tensor(aug))


def batch_mix(aug: AugmentConfig, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix on a collated batch (one of the two chosen per batch when both are on)."""
    mixes = []
    if aug.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
    if aug.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
