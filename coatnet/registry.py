"""Named CoAtNet variants (the paper's Table 12 plus small CPU ones) and ``create_model``."""

from __future__ import annotations

from typing import Any

import torch

from coatnet.config import CoAtNetConfig
from coatnet.model import CoAtNet

_REGISTRY: dict[str, CoAtNetConfig] = {}

# The paper's reported sizes (Tables 12-14): params, and GFLOPs (multiply-adds) by resolution.
PAPER_FIGURES: dict[str, dict[str, Any]] = {
    "coatnet_0": {"params": 25e6, "gmacs": {224: 4.2, 384: 13.4}},
    "coatnet_1": {"params": 42e6, "gmacs": {224: 8.4, 384: 27.4}},
    "coatnet_2": {"params": 75e6, "gmacs": {224: 15.7, 384: 49.8, 512: 96.7}},
    "coatnet_3": {"params": 168e6, "gmacs": {224: 34.7, 384: 107.4, 512: 203.1}},
    "coatnet_4": {"params": 275e6, "gmacs": {384: 189.5, 512: 360.9}},
    "coatnet_5": {"params": 688e6, "gmacs": {512: 812.0}},
    # The paper's table says 1.47B, but its own architecture table (Table 12) gives ~1.34B; what this
    # package builds (and tests) is the Table 12 architecture: see DOCUMENTED_PARAMS.
    "coatnet_6": {"params": 1.47e9, "gmacs": {512: 1521.0}},
    "coatnet_7": {"params": 2.44e9, "gmacs": {512: 2586.0}},
}

# Where this package deliberately differs from the paper's headline figure (and why).
DOCUMENTED_PARAMS: dict[str, tuple[float, str]] = {
    "coatnet_6": (1.34e9, "paper text says 1.47B; its Table 12 architecture counts ~1.34B, which is what is built"),
}


def register(config: CoAtNetConfig) -> CoAtNetConfig:
    if config.name in _REGISTRY:
        raise ValueError(f"variant {config.name!r} is already registered")
    _REGISTRY[config.name] = config
    return config


def list_models() -> list[str]:
    """Names of every registered variant, small ones first then coatnet_0..7."""
    return list(_REGISTRY)


def get_config(name: str) -> CoAtNetConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown CoAtNet variant {name!r}; known: {', '.join(_REGISTRY)}") from None


def create_model(
    name: str | CoAtNetConfig,
    *,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> CoAtNet:
    """Build a variant by name (or from a config), with config fields overridden by keyword.

    ``device="meta"`` builds without allocating (inspect or count CoAtNet-7); materialise later with
    ``model.to_empty(device=...)`` then ``model.init_weights()``.
    Unknown override keys raise ValueError naming them, before anything is built.
    """
    cfg = get_config(name) if isinstance(name, str) else name
    changes = dict(overrides)
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if img_size is not None:
        changes["img_size"] = img_size
    if drop_path_rate is not None:
        changes["drop_path_rate"] = drop_path_rate
    if changes:
        cfg = cfg.replace(**changes)
    if device is None:
        return CoAtNet(cfg)
    with torch.device(device):
        return CoAtNet(cfg)


_C, _T = "mbconv", "transformer"

# Small variants for CPU work, built from the same blocks (not in the paper). Their runs are a few
# hundred steps, too short for BN running statistics at the paper's momentum 0.01 (eval accuracy
# stays at chance for the first few hundred steps), so they use PyTorch's default 0.1.
register(
    CoAtNetConfig(
        name="coatnet_pico", stem_width=16, depths=(1, 1, 1, 1), widths=(24, 32, 64, 128), head_dim=16,
        bn_momentum=0.1,
    )
)
register(
    CoAtNetConfig(
        name="coatnet_nano", stem_width=24, depths=(1, 2, 2, 1), widths=(32, 48, 96, 192), head_dim=32,
        bn_momentum=0.1,
    )
)

# The paper's Table 12 (head size 32 for 0-4, 64 for 5, 128 for 6/7).
register(CoAtNetConfig(name="coatnet_0", stem_width=64, depths=(2, 3, 5, 2), widths=(96, 192, 384, 768)))
register(CoAtNetConfig(name="coatnet_1", stem_width=64, depths=(2, 6, 14, 2), widths=(96, 192, 384, 768)))
register(CoAtNetConfig(name="coatnet_2", stem_width=128, depths=(2, 6, 14, 2), widths=(128, 256, 512, 1024)))
register(CoAtNetConfig(name="coatnet_3", stem_width=192, depths=(2, 6, 14, 2), widths=(192, 384, 768, 1536)))
register(CoAtNetConfig(name="coatnet_4", stem_width=192, depths=(2, 12, 28, 2), widths=(192, 384, 768, 1536)))
register(
    CoAtNetConfig(name="coatnet_5", stem_width=192, depths=(2, 12, 28, 2), widths=(256, 512, 1280, 2048), head_dim=64)
)
# 6/7: S3 = 8 MBConv blocks at the S2->S3 stride, then 42 Transformer blocks at double width.
register(
    CoAtNetConfig(
        name="coatnet_6", stem_width=192, depths=(2, 4, 42, 2), widths=(192, 384, 1536, 2048),
        s3_mbconv_depth=8, s3_mbconv_width=768, head_dim=128,
    )
)
register(
    CoAtNetConfig(
        name="coatnet_7", stem_width=192, depths=(2, 4, 42, 2), widths=(256, 512, 2048, 3072),
        s3_mbconv_depth=8, s3_mbconv_width=1024, head_dim=128,
    )
)
