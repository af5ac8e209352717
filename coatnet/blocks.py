"""CoAtNet's three block kinds: the conv stem (S0), MBConv (S1/S2) and the relative Transformer (S3/S4).

All blocks take and return (B, C, H, W) tensors. Transformer blocks work on the (B, H, W, C) view of
that tensor: with channels_last memory the view is contiguous, so going between conv and attention
stages costs no copy (permute only changes strides).
"""

from __future__ import annotations

import torch
from torch import nn

from coatnet.attention import RelativeAttention
from coatnet.config import CoAtNetConfig
from coatnet.layers import DropPath, Pool2d, SqueezeExcite, batch_norm


class Stem(nn.Module):
    """S0: 3x3/s2 conv -> BN -> GELU -> 3x3 conv. Its output feeds pre-norm blocks, so it ends un-normalised."""

    def __init__(self, in_chans: int, width: int, cfg: CoAtNetConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False)
        self.norm1 = batch_norm(width, cfg.bn_eps, cfg.bn_momentum)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.norm1(self.conv1(x))))


class MBConv(nn.Module):
    """Pre-activation inverted bottleneck: x + Proj1x1(SE(DW3x3(Expand1x1(BN(x))))).

    Downsampling (paper's Eq. 5): Proj(Pool(x)) + branch, with the stride in the first 1x1 conv
    ("eq5", the default) or in the depthwise conv ("strided_dwconv", the paper's Table 9 ablation).
    """

    def __init__(self, dim_in: int, dim_out: int, stride: int, cfg: CoAtNetConfig, drop_path: float) -> None:
        super().__init__()
        mid = int(round(dim_out * cfg.expand_ratio))
        rd = max(1, int(round(dim_out * cfg.se_ratio)))
        s_expand, s_dw = (stride, 1) if cfg.downsample == "eq5" else (1, stride)
        self.pool = Pool2d(cfg.pool) if stride == 2 else nn.Identity()
        self.shortcut = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()
        self.norm = batch_norm(dim_in, cfg.bn_eps, cfg.bn_momentum)
        self.conv1 = nn.Conv2d(dim_in, mid, 1, stride=s_expand, bias=False)
        self.norm1 = batch_norm(mid, cfg.bn_eps, cfg.bn_momentum)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=s_dw, padding=1, groups=mid, bias=False)
        self.norm2 = batch_norm(mid, cfg.bn_eps, cfg.bn_momentum)
        self.act = nn.GELU()
        self.se = SqueezeExcite(mid, rd)
        self.conv3 = nn.Conv2d(mid, dim_out, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(self.pool(x))
        x = self.act(self.norm1(self.conv1(self.norm(x))))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.conv3(self.se(x))
        return shortcut + self.drop_path(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _pool_nhwc(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class TransformerBlock(nn.Module):
    """Pre-norm relative-attention block; downsampling: Proj(Pool(x)) + Attention(Pool(LN(x)))."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        stride: int,
        grid: tuple[int, int],
        cfg: CoAtNetConfig,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.pool = Pool2d(cfg.pool) if stride == 2 else None
        # A width change without a stride happens at CoAtNet-6/7's MBConv->TFM switch inside S3:
        # a projection shortcut is the natural reading of the paper there.
        self.shortcut = nn.Linear(dim_in, dim_out) if dim_in != dim_out else nn.Identity()
        self.norm1 = nn.LayerNorm(dim_in, eps=cfg.ln_eps)
        self.attn = RelativeAttention(dim_in, dim_out, cfg.head_dim, grid, cfg.attn_impl, cfg.cache_bias)
        self.norm2 = nn.LayerNorm(dim_out, eps=cfg.ln_eps)
        self.mlp = Mlp(dim_out, int(round(dim_out * cfg.ffn_ratio)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C); free when x is channels_last
        a = self.norm1(x)
        if self.pool is not None:
            x, a = _pool_nhwc(self.pool, x), _pool_nhwc(self.pool, a)
        b, h, w, c = a.shape
        a = self.attn(a.reshape(b, h * w, c)).view(b, h, w, -1)
        x = self.shortcut(x) + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)
