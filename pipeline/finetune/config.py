"""A fine-tuning recipe: the trainer's own config plus a ``finetune:`` section.

    finetune:
      pretrained: runs/pretrain/coatnet_2_in21k_224   # run dir, checkpoints dir, step dir or .safetensors
      source_classes: data/imagenet21k                 # pretraining dataset root, or timm:imagenet-22k
      head_init: select                                # select | mean | zero
    name: ...                                          # everything else: pipeline.train's TrainConfig

Overrides ``finetune.key=value`` go to the section, all others to the trainer's config, so a
recipe is checked by the same validation as pretraining (unknown keys rejected by name).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.finetune.head import HEAD_MODES
from pipeline.train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    check_shards,
    from_dict,
    read_recipe,
)

SECTION = "finetune"


@dataclass(frozen=True)
class FinetuneSection:
    pretrained: str
    source_classes: str | None = None
    head_init: str = "select"

    def validate(self) -> None:
        if not self.pretrained:
            raise ConfigError("finetune.pretrained: the pretrained checkpoint or weights are required")
        if self.head_init not in HEAD_MODES:
            raise ConfigError(f"finetune.head_init: {self.head_init!r} is not one of {list(HEAD_MODES)}")
        if self.head_init != "zero" and not self.source_classes:
            raise ConfigError(
                f"finetune.source_classes: head_init={self.head_init} maps pretraining classes to fine-tuning "
                "classes; give the pretraining dataset root or timm:<subset> (or head_init=zero)"
            )


@dataclass(frozen=True)
class FinetuneConfig:
    finetune: FinetuneSection
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {SECTION: dataclasses.asdict(self.finetune), **self.train.to_dict()}

    def replace_train(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self, train=self.train.replace(**changes))


def from_mapping(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), *,
                 check_data: bool = True) -> FinetuneConfig:
    data = dict(data)
    section = data.pop(SECTION, None)
    if not isinstance(section, dict):
        raise ConfigError(f"{SECTION}: a mapping with at least 'pretrained' is required")
    mine = [o[len(SECTION) + 1:] for o in overrides if o.startswith(f"{SECTION}.")]
    theirs = [o for o in overrides if not o.startswith(f"{SECTION}.")]
    section = apply_overrides(section, mine)
    known = {f.name for f in dataclasses.fields(FinetuneSection)}
    for k, v in section.items():
        if k not in known:
            raise ConfigError(f"unknown key '{SECTION}.{k}' (known keys of {SECTION}: {', '.join(sorted(known))})")
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{SECTION}.{k}: expected a string, got {v!r}")
    ft = FinetuneSection(**section)
    ft.validate()
    train = from_dict(apply_overrides(data, theirs))
    if check_data:
        check_shards(train)
    return FinetuneConfig(ft, train)


def load_finetune_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                         check_data: bool = True) -> FinetuneConfig:
    """Load, override and validate a fine-tuning recipe (``configs/finetune/*.yaml``)."""
    return from_mapping(read_recipe(path), list(overrides), check_data=check_data)
