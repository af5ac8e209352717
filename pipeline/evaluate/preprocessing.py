"""The preprocessing a fine-tuned model expects, as data: evaluation applies it, the registry records it.

It mirrors the trainer's evaluation transform (``pipeline.train.transforms.eval_transform``)
field for field, so the registry can tell a user exactly what to feed the model without
shipping the training config. Fine-tuning recipes use ``center_crop=False`` (the paper's
Table 10: the whole image resized to the target resolution).
"""

from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    center_crop: bool = False
    crop_pct: float = 0.875

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        # For people and other tools: the input the logged model takes.
        d["input"] = {"dtype": "float32", "layout": "NCHW", "channels": "RGB",
                      "shape": [-1, 3, self.img_size, self.img_size],
                      "scale": "pixels / 255, then (x - mean) / std"}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)

    @classmethod
    def from_train_config(cls, cfg: Any) -> Preprocessing:
        """From a ``pipeline.train.config.TrainConfig`` (its model, augment and eval sections)."""
        return cls(
            img_size=int(cfg.model.img_size),
            mean=tuple(cfg.augment.mean),
            std=tuple(cfg.augment.std),
            interpolation=cfg.augment.interpolation,
            center_crop=bool(cfg.eval.center_crop),
            crop_pct=float(cfg.eval.crop_pct),
        )

    @functools.cached_property
    def transform(self):
        """PIL image -> normalised float32 CHW tensor (torchvision.transforms.v2)."""
        interp = InterpolationMode(self.interpolation)
        if self.center_crop:
            ops: list = [T.Resize(int(round(self.img_size / self.crop_pct)), interpolation=interp, antialias=True),
                         T.CenterCrop(self.img_size)]
        else:
            ops = [T.Resize((self.img_size, self.img_size), interpolation=interp, antialias=True)]
        return T.Compose([*ops, T.ToImage(), T.ToDtype(torch.float32, scale=True),
                          T.Normalize(list(self.mean), list(self.std))])

    def decode(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes (JPEG/PNG) -> the model's input tensor (3, H, W)."""
        with Image.open(io.BytesIO(data)) as im:
            return self.transform(im.convert("RGB"))
