"""Small building layers shared by the blocks: stochastic depth, squeeze-excitation, pooling, norms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample (scaled to keep the expectation)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features (Hu et al.); Linear on pooled (B, C) == 1x1 conv."""

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, rd_channels)
        self.act = nn.SiLU()  # EfficientNet/MaxViT convention for the SE gate's hidden activation
        self.fc2 = nn.Linear(rd_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3))
        s = self.fc2(self.act(self.fc1(s))).sigmoid()
        return x * s[:, :, None, None]


class Pool2d(nn.Module):
    """3x3 stride-2 pooling with padding 1, so every stride-2 path gives ceil(H/2) on odd sizes too."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return F.max_pool2d(x, 3, 2, 1)
        return F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)

    def extra_repr(self) -> str:
        return self.kind


def batch_norm(channels: int, eps: float, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


def init_weights(module: nn.Module, std: float, xavier: frozenset[int] = frozenset()) -> None:
    """normal(std) for conv/linear weights, zero biases, unit/zero norms (MaxViT's choices; the paper is silent);
    xavier_uniform for the linears whose ``id`` is in ``xavier``."""
    if isinstance(module, nn.Linear) and id(module) in xavier:
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d | nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
