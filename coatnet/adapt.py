"""Adapting checkpoints to a model: relative-position tables to new resolutions, and the classifier head.

``adapt_state_dict`` is the one function for this; every ``CoAtNet.load_state_dict`` runs it through a
load hook (tables only), so a 224 checkpoint loads directly into a 384 model with no missing or
unexpected keys. Changing the head's class count is never implicit: pass ``head=`` explicitly, or load
with ``load_pretrained``. The key names and the shape-level work live in ``coatnet.state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from coatnet.config import CoAtNetConfig
from coatnet.model import CoAtNet
from coatnet.registry import get_config
from coatnet.state_dict import (
    HEAD_MODES,
    adapt_to_shapes,
    check_head_args,
    param_shapes,
    resize_rel_pos_table,
    strip_wrapper_prefix,
)

__all__ = ["HEAD_MODES", "adapt_state_dict", "load_pretrained", "resize_rel_pos_table", "strip_wrapper_prefix"]


def _target(target: nn.Module | CoAtNetConfig | str) -> tuple[dict[str, torch.Size], CoAtNetConfig, int]:
    if isinstance(target, str):
        target = get_config(target)
    if isinstance(target, CoAtNetConfig):
        with torch.device("meta"):  # shapes only: no memory, even for CoAtNet-7
            model = CoAtNet(target)
        return {k: v.shape for k, v in model.state_dict().items()}, target, target.num_classes
    if isinstance(target, CoAtNet):
        return param_shapes(target), target.config, target.num_classes
    raise TypeError(f"target must be a CoAtNet, a CoAtNetConfig or a variant name, not {type(target).__name__}")


def adapt_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    target: nn.Module | CoAtNetConfig | str,
    *,
    head: str = "keep",
    class_index: Sequence[int] | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` that fits ``target`` (a model, a config or a variant name).

    - Every relative-position table whose size differs from the target's is resized bilinearly.
    - ``head="keep"`` (default) leaves the classifier alone (a class-count mismatch then fails on load).
      ``head="reset"`` replaces it with a freshly initialised classifier of the target's class count
      (normal(init_std) weight, zero bias; drawn from torch's global RNG). ``head="select"`` keeps the
      rows ``class_index`` of the checkpoint's classifier, e.g. the 1K rows of a 21K head; the
      target's class count must equal ``len(class_index)``.
    Raises ValueError with the key named when a table cannot be adapted (e.g. another head count).
    """
    check_head_args(head, class_index)  # before building anything for the target
    shapes, cfg, num_classes = _target(target)
    return adapt_to_shapes(state_dict, shapes, cfg, num_classes, head=head, class_index=class_index)


def load_pretrained(
    model: CoAtNet,
    state_dict: Mapping[str, torch.Tensor],
    *,
    head: str = "keep",
    class_index: Sequence[int] | torch.Tensor | None = None,
    strict: bool = True,
) -> Any:
    """Load a checkpoint of any resolution into ``model``, saying explicitly what happens to the head."""
    sd = adapt_state_dict(state_dict, model, head=head, class_index=class_index)
    return model.load_state_dict(sd, strict=strict)
