"""The sharding configuration: what determines the bytes written, and therefore the output location."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from pipeline.data.preprocess import DEFAULT_MAX_PIXELS
from pipeline.errors import UserError

# Bump when the layout or the preprocessing changes the bytes written for the same config.
FORMAT_VERSION = 1
DEFAULT_MINIVAL_FRACTION = 0.02
DEFAULT_SHARD_SIZE = 1 << 26  # 64 MiB, streaming's default


class ShardConfigError(UserError, ValueError):
    """A sharding option out of range; rejected before any work."""


@dataclass(frozen=True)
class ShardConfig:
    source: str  # normalised source spec
    max_side: int = 320
    jpeg_quality: int = 90
    minival_fraction: float = DEFAULT_MINIVAL_FRACTION
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_size_limit: int = DEFAULT_SHARD_SIZE
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        problems = []
        if not 8 <= self.max_side <= 16384:
            problems.append(f"max_side={self.max_side} (expected 8..16384)")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality={self.jpeg_quality} (expected 1..100)")
        if not 0.0 <= self.minival_fraction < 0.5:
            problems.append(f"minival_fraction={self.minival_fraction} (expected 0 <= f < 0.5)")
        if self.max_pixels < 1:
            problems.append(f"max_pixels={self.max_pixels} (expected >= 1)")
        if self.shard_size_limit < 1 << 16:
            problems.append(f"shard_size_limit={self.shard_size_limit} (expected >= 64 KiB)")
        if problems:
            raise ShardConfigError("invalid shard config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
