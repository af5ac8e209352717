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
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from pipeline.finetune.head import HEAD_MODES
from pipeline.train.config import (
    ConfigError,
    Str,
    TrainConfig,
    apply_overrides,
    check_shards,
    config_error,
    from_dict,
    read_recipe,
    section,
)

SECTION = "finetune"


@section
class FinetuneSection:
    pretrained: Str
    source_classes: Str | None = None
    head_init: Literal[HEAD_MODES] = "select"  # type: ignore[valid-type]  # the tuple's values


@dataclass(frozen=True)
class FinetuneConfig:
    finetune: FinetuneSection
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {SECTION: dataclasses.asdict(self.finetune), **self.train.to_dict()}

    def replace_train(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self, train=self.train.replace(**changes))


_SECTION = TypeAdapter(FinetuneSection)


def from_mapping(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), *,
                 check_data: bool = True) -> FinetuneConfig:
    data = dict(data)
    section_data = data.pop(SECTION, None)
    if not isinstance(section_data, dict):
        raise ConfigError(f"{SECTION}: a mapping with at least 'pretrained' is required")
    mine = [o[len(SECTION) + 1:] for o in overrides if o.startswith(f"{SECTION}.")]
    theirs = [o for o in overrides if not o.startswith(f"{SECTION}.")]
    section_data = apply_overrides(section_data, mine)
    if not section_data.get("pretrained"):
        raise ConfigError(f"{SECTION}.pretrained: the pretrained checkpoint or weights are required")
    try:
        ft = _SECTION.validate_python(section_data)
    except ValidationError as e:
        raise config_error(e, FinetuneSection, SECTION) from None
    if ft.head_init != "zero" and not ft.source_classes:
        raise ConfigError(
            f"{SECTION}.source_classes: head_init={ft.head_init} maps pretraining classes to fine-tuning "
            "classes; give the pretraining dataset root or timm:<subset> (or head_init=zero)")
    train = from_dict(apply_overrides(data, theirs))
    if check_data:
        check_shards(train)
    return FinetuneConfig(ft, train)


def load_finetune_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                         check_data: bool = True) -> FinetuneConfig:
    """Load, override and validate a fine-tuning recipe (``configs/finetune/*.yaml``)."""
    return from_mapping(read_recipe(path), list(overrides), check_data=check_data)
