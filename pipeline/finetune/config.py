"""A fine-tuning recipe: the trainer's own config plus a ``finetune:`` section.

    finetune:
      follows: ../pretrain/coatnet_2_in21k.yaml    # the pretraining recipe this row fine-tunes
      head_init: select                            # select | mean | zero
    name: ...                                      # everything else: pipeline.train's TrainConfig

``follows`` (relative to the file that sets it; to the working directory in an override) connects the
recipe to its pretraining: ``pretrained`` defaults to that recipe's ``output_dir`` (its run directory) and
``source_classes`` to its ``data.root`` (its dataset, whose manifest holds the label space), and the
fine-tuning ``model.name`` must be the variant it pretrains. Either may still be given explicitly
(``pretrained``: run dir, checkpoints dir, step dir or .safetensors; ``source_classes``: a dataset root or
``timm:imagenet-22k``), which is what the flows do with the locations of their own runs.

Overrides ``finetune.key=value`` go to the section, all others to the trainer's config, so a recipe is
checked by the same validation as pretraining (unknown keys rejected by name).
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
    load_config,
    read_recipe,
    section,
)

SECTION = "finetune"


@section
class FinetuneSection:
    pretrained: Str
    source_classes: Str | None = None
    head_init: Literal[HEAD_MODES] = "select"  # type: ignore[valid-type]  # the tuple's values
    # The pretraining recipe this one continues (kept for the record; its links are resolved on loading).
    follows: Str | None = None


@dataclass(frozen=True)
class FinetuneConfig:
    finetune: FinetuneSection
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {SECTION: dataclasses.asdict(self.finetune), **self.train.to_dict()}

    def replace_train(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self, train=self.train.replace(**changes))


_SECTION = TypeAdapter(FinetuneSection)


def followed_recipe(follows: str) -> TrainConfig:
    """The pretraining recipe a fine-tuning recipe follows, validated (its shards need not exist)."""
    try:
        return load_config(follows, check_data=False)
    except ConfigError as e:
        raise ConfigError(f"{SECTION}.follows: {follows}: {e}") from e


def from_mapping(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), *,
                 check_data: bool = True) -> FinetuneConfig:
    data = dict(data)
    section_data = data.pop(SECTION, None)
    if not isinstance(section_data, dict):
        raise ConfigError(f"{SECTION}: a mapping with 'pretrained' or 'follows' is required")
    mine = [o[len(SECTION) + 1:] for o in overrides if o.startswith(f"{SECTION}.")]
    theirs = [o for o in overrides if not o.startswith(f"{SECTION}.")]
    section_data = apply_overrides(section_data, mine)
    pretraining = None
    if isinstance(section_data.get("follows"), str):
        pretraining = followed_recipe(section_data["follows"])
        for key, value in (("pretrained", pretraining.output_dir), ("source_classes", pretraining.data.root)):
            if section_data.get(key) is None:
                section_data[key] = value
    if not section_data.get("pretrained"):
        raise ConfigError(f"{SECTION}.pretrained: the pretrained checkpoint or weights are required "
                          f"(or {SECTION}.follows: the pretraining recipe)")
    try:
        ft = _SECTION.validate_python(section_data)
    except ValidationError as e:
        raise config_error(e, FinetuneSection, SECTION) from None
    if ft.head_init != "zero" and not ft.source_classes:
        raise ConfigError(
            f"{SECTION}.source_classes: head_init={ft.head_init} maps pretraining classes to fine-tuning "
            "classes; give the pretraining dataset root or timm:<subset> (or head_init=zero)")
    train = from_dict(apply_overrides(data, theirs))
    if pretraining is not None and train.model.name != pretraining.model.name:
        raise ConfigError(
            f"model.name: {train.model.name}, but {SECTION}.follows={ft.follows} pretrains "
            f"{pretraining.model.name}; its weights fit only the same variant")
    if check_data:
        check_shards(train)
    return FinetuneConfig(ft, train)


def load_finetune_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                         check_data: bool = True) -> FinetuneConfig:
    """Load, override and validate a fine-tuning recipe (``configs/finetune/*.yaml``)."""
    return from_mapping(read_recipe(path, file_relative=(f"{SECTION}.follows",)), list(overrides),
                        check_data=check_data)
