"""The frozen configuration of one CoAtNet variant.

A config fully describes an architecture (and the few run-time options that change
how, not what, it computes). It round-trips through dicts, JSON and YAML, so that a
training run can record exactly what it built.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

BLOCK_TYPES = ("mbconv", "transformer")
DOWNSAMPLE_MODES = ("eq5", "strided_dwconv")
POOL_TYPES = ("max", "avg")
ATTN_IMPLS = ("sdpa", "eager")
TRANSFORMER_INITS = ("xavier_uniform", "normal")


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"img_size must be an int or a pair (H, W), got {v!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class CoAtNetConfig:
    """Architecture of a CoAtNet (C-C-T-T layout, paper's Table 12 notation).

    Stage S0 is the two-layer conv stem; S1..S4 are given by ``depths``/``widths``/``block_types``.
    CoAtNet-6/7 open S3 with ``s3_mbconv_depth`` MBConv blocks of width ``s3_mbconv_width``
    (these carry S3's stride) before its ``depths[2]`` transformer blocks of width ``widths[2]``.
    """

    name: str = "custom"
    stem_width: int = 64
    depths: tuple[int, ...] = (2, 3, 5, 2)
    widths: tuple[int, ...] = (96, 192, 384, 768)
    block_types: tuple[str, ...] = ("mbconv", "mbconv", "transformer", "transformer")
    s3_mbconv_depth: int = 0
    s3_mbconv_width: int = 0
    head_dim: int = 32
    expand_ratio: float = 4.0  # MBConv hidden width = expand_ratio x block output width
    se_ratio: float = 0.25  # SE width = se_ratio x block output width
    ffn_ratio: float = 4.0
    downsample: str = "eq5"  # "eq5": stride in the first 1x1 conv; "strided_dwconv": in the depthwise conv
    pool: str = "max"  # shortcut (and attention-input) pooling of downsampling blocks
    drop_path_rate: float = 0.0  # ramped linearly from 0 over all S1..S4 blocks
    num_classes: int = 1000
    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    head_norm: bool = True  # LayerNorm after global pooling (pre-activation leaves the trunk un-normalised)
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01  # PyTorch convention (= TF 0.99)
    ln_eps: float = 1e-5
    init_std: float = 0.02  # normal(init_std): convs, SE, head and relative tables
    # The attention and MLP linears of the transformer blocks. xavier_uniform scales with width (ViT's and
    # timm's choice; at CoAtNet-0's S4 it is 0.026, near MaxViT's 0.02); a fixed normal(0.02) starves small
    # widths: coatnet_pico at 64 px reached 0.11 top-1 after one epoch against 0.67 (benchmarks/train_parity.py).
    transformer_init: str = "xavier_uniform"
    # Run-time options: same parameters and same function, different kernels/layouts.
    attn_impl: str = "sdpa"  # "sdpa": F.scaled_dot_product_attention with a float mask; "eager": reference
    channels_last: bool = True  # activations (never parameters) in channels_last memory
    cache_bias: bool = True  # reuse the gathered relative bias in inference while the table is unchanged

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", _pair(self.img_size))
        for f in ("depths", "widths", "block_types"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        self.validate()

    def validate(self) -> None:
        """Reject inconsistent configs before any compute, naming the offending field."""
        n = len(self.depths)
        if not (len(self.widths) == len(self.block_types) == n == 4):
            raise ValueError(
                f"{self.name}: depths, widths and block_types need 4 entries (S1..S4), got "
                f"{len(self.depths)}, {len(self.widths)}, {len(self.block_types)}"
            )
        for t in self.block_types:
            if t not in BLOCK_TYPES:
                raise ValueError(f"{self.name}: block type {t!r} not in {BLOCK_TYPES}")
        if any(d < 1 for d in self.depths) or any(w < 1 for w in self.widths) or self.stem_width < 1:
            raise ValueError(f"{self.name}: depths and widths must be positive")
        for t, w in zip(self.block_types, self.widths):
            if t == "transformer" and w % self.head_dim:
                raise ValueError(f"{self.name}: width {w} is not a multiple of head_dim {self.head_dim}")
        if self.s3_mbconv_depth < 0 or (self.s3_mbconv_depth > 0) != (self.s3_mbconv_width > 0):
            raise ValueError(f"{self.name}: s3_mbconv_depth and s3_mbconv_width go together")
        if self.downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"{self.name}: downsample {self.downsample!r} not in {DOWNSAMPLE_MODES}")
        if self.pool not in POOL_TYPES:
            raise ValueError(f"{self.name}: pool {self.pool!r} not in {POOL_TYPES}")
        if self.transformer_init not in TRANSFORMER_INITS:
            raise ValueError(f"{self.name}: transformer_init {self.transformer_init!r} not in {TRANSFORMER_INITS}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"{self.name}: attn_impl {self.attn_impl!r} not in {ATTN_IMPLS}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"{self.name}: drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.num_classes < 0:
            raise ValueError(f"{self.name}: num_classes must be >= 0 (0 = no classifier)")
        if min(self.img_size) < 32:
            raise ValueError(f"{self.name}: img_size {self.img_size} is below 32 (five stride-2 stages)")
        if self.expand_ratio <= 0 or self.ffn_ratio <= 0 or not 0 < self.se_ratio <= 1:
            raise ValueError(f"{self.name}: expand_ratio/ffn_ratio must be > 0 and se_ratio in (0, 1]")

    # --- derived geometry -------------------------------------------------------------------
    def feature_sizes(self) -> list[tuple[int, int]]:
        """Spatial size after S0..S4 (each stride 2, ceil as for 3x3/s2/p1 and 1x1/s2 layers)."""
        h, w = self.img_size
        out = []
        for _ in range(5):
            h, w = (h + 1) // 2, (w + 1) // 2
            out.append((h, w))
        return out

    def total_blocks(self) -> int:
        return sum(self.depths) + self.s3_mbconv_depth

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoAtNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CoAtNet config key(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, s: str) -> CoAtNetConfig:
        return cls.from_dict(json.loads(s))

    def to_yaml(self) -> str:
        # lazy: the model package needs only torch; PyYAML only when YAML is asked for
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, s: str) -> CoAtNetConfig:
        import yaml  # lazy, as in to_yaml

        return cls.from_dict(yaml.safe_load(s))

    def replace(self, **changes: Any) -> CoAtNetConfig:
        """A copy with some fields changed; unknown fields are an error naming the key."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown CoAtNet config key(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)
