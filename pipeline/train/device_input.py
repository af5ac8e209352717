"""The device side of the input pipeline: a loader batch of uint8 pixels -> the model's input and targets.

The loader's workers send uint8 (N, H, W, 3) batches: a quarter of float32's bytes through worker IPC,
pinned memory and the host-to-device copy, and no per-pixel float work on the CPU cores that decode.
After the copy, on the device:
  1. the NHWC batch viewed as NCHW is channels_last memory already, so the layout costs no copy, and the
     float32 conversion writes channels_last directly;
  2. scaling and normalisation are the operations torchvision's ``ToDtype(scale=True)`` and ``Normalize``
     apply, in the same order and precision, so the values equal the CPU transform's
     (``transforms.train_transform``) bit for bit;
  3. MixUp/CutMix in float32, with the draws of before: seeded by the batch's sample ids, on the CPU
     generator (the device generator, which drop-path draws from, is left alone);
  4. the cast to the model's input dtype (bf16 on GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from pipeline.train.config import TrainConfig
from pipeline.train.transforms import augment_seed, batch_mix


@functools.lru_cache(maxsize=16)
def _stats(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached: a fresh tensor per batch would be a small synchronous host-to-device copy per step.
    def t(v: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device)

    return t(mean), t(std)


def normalize(images: torch.Tensor, device: torch.device | str, *, mean: tuple[float, ...],
              std: tuple[float, ...], channels_last: bool = True) -> torch.Tensor:
    """uint8 (N, H, W, C) pixels -> float32 (N, C, H, W) ``(pixels / 255 - mean) / std`` on ``device``,
    in channels_last memory (or contiguous NCHW with ``channels_last=False``)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != len(mean):
        raise TypeError(f"expected uint8 images of shape (N, H, W, {len(mean)}) from the loader, got "
                        f"{images.dtype} {tuple(images.shape)}")
    device = torch.device(device)
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
    if not channels_last:
        x = x.contiguous()
    m, s = _stats(device, tuple(mean), tuple(std))
    # As torchvision: image.to(float32).mul_(1 / 255), then image.sub(mean).div_(std).
    return x.to(torch.float32).mul_(1.0 / 255).sub_(m).div_(s)


def mix_batch(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, mix: Callable, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp/CutMix of a normalised float batch, its draws seeded by the run seed and the batch's first
    sample ids: the same mix whether the run was resumed or not, on whichever rank or worker."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone (torch.manual_seed would also reseed the device's, which drop-path uses).
        torch.default_generator.manual_seed(augment_seed(seed, *idx.tolist()[:8]))
        return mix(x, y)


def to_device(batch: dict, device: torch.device | str, dtype: torch.dtype, cfg: TrainConfig, *,
              mix_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch (``image`` uint8 (N, H, W, 3), ``label``, ``idx``) -> (x, y) on ``device``.

    ``x``: normalised with the recipe's mean and std, in ``dtype``, channels_last unless the model's
    overrides turn channels_last off. ``mix_classes``: for training batches, the number of classes, and the
    recipe's MixUp/CutMix (if any) is applied (``y`` then holds soft targets); None (evaluation): no mixing.
    """
    aug = cfg.augment
    channels_last = bool(cfg.model.overrides.get("channels_last", True))
    x = normalize(batch["image"], device, mean=tuple(aug.mean), std=tuple(aug.std), channels_last=channels_last)
    y = batch["label"].to(x.device, non_blocking=True)
    mix = batch_mix(aug, mix_classes) if mix_classes else None
    if mix is not None:
        # Masked samples (``keep`` False: duplicates the sharding found, data.py) are mixed like the others. Their
        # own slot weighs 0 in the loss (step.py), so what remains of one is its partner share in a neighbour's
        # mix, the share every image of a batch gives as a partner. Taking them out of the mix would change the
        # batch's pairs and draws, which are seeded by its sample ids so that any world size and any resume
        # reproduce them, and would make the mix depend on the manifest rather than on the samples.
        x, y = mix_batch(x, y, batch["idx"], mix, cfg.seed)
    return x.to(dtype), y
