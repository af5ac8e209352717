"""Adapting checkpoints to a model: relative-position tables to new resolutions, and the classifier head.

``adapt_state_dict`` is the one function for this; every ``CoAtNet.load_state_dict`` runs it through a
load hook (tables only), so a 224 checkpoint loads directly into a 384 model with no missing or
unexpected keys. Changing the head's class count is never implicit: pass ``head=`` explicitly, or load
with ``load_pretrained``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coatnet.config import CoAtNetConfig
from coatnet.model import HEAD_BIAS, HEAD_WEIGHT, TABLE_SUFFIX, CoAtNet

HEAD_MODES = ("keep", "reset", "select")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DeepSpeed wrappers, torch.compile


def resize_rel_pos_table(table: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (heads, 2H-1, 2W-1) table to (heads, *size) bilinearly (the paper's method).

    align_corners=False maps the zero offset (the centre) onto the centre and is the identity at the
    same size; computed in fp32 whatever the checkpoint's dtype.
    """
    out = F.interpolate(table[None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return out[0].to(table.dtype)


def strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a 'module.' or '_orig_mod.' prefix shared by every key (wrapped or compiled models)."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _target(target: nn.Module | CoAtNetConfig | str) -> tuple[dict[str, torch.Size], CoAtNetConfig, int]:
    if isinstance(target, str):
        from coatnet.registry import get_config

        target = get_config(target)
    if isinstance(target, CoAtNetConfig):
        with torch.device("meta"):  # shapes only: no memory, even for CoAtNet-7
            model = CoAtNet(target)
        return {k: v.shape for k, v in model.state_dict().items()}, target, target.num_classes
    if isinstance(target, CoAtNet):
        # ds_shape: DeepSpeed ZeRO-3 leaves partitioned parameters empty and keeps their real shape there
        shapes = {n: getattr(p, "ds_shape", p.shape) for n, p in target.named_parameters()}
        return shapes, target.config, target.num_classes
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
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    if (head == "select") != (class_index is not None):
        raise ValueError("class_index goes with head='select' (and head='select' needs class_index)")
    shapes, cfg, num_classes = _target(target)
    out = strip_wrapper_prefix(state_dict)
    for k, v in list(out.items()):
        if not k.endswith(TABLE_SUFFIX) or k not in shapes or tuple(v.shape) == tuple(shapes[k]):
            continue
        want = shapes[k]
        if v.ndim != 3 or v.shape[0] != want[0]:
            raise ValueError(
                f"{k}: checkpoint table {tuple(v.shape)} cannot be adapted to {tuple(want)} "
                "(tables are resized per head; the head count must match)"
            )
        out[k] = resize_rel_pos_table(v, (want[1], want[2]))
    if head == "reset":
        out.pop(HEAD_WEIGHT, None)
        out.pop(HEAD_BIAS, None)
        if num_classes > 0:
            w = torch.empty(num_classes, cfg.widths[-1])
            nn.init.normal_(w, std=cfg.init_std)
            out[HEAD_WEIGHT], out[HEAD_BIAS] = w, torch.zeros(num_classes)
    elif head == "select":
        idx = torch.as_tensor(class_index, dtype=torch.long)
        if HEAD_WEIGHT not in out:
            raise ValueError("head='select' but the checkpoint has no classifier (head.fc.weight)")
        n_ckpt = out[HEAD_WEIGHT].shape[0]
        if idx.ndim != 1 or len(idx) != num_classes:
            raise ValueError(f"class_index has {tuple(idx.shape)} entries, the target has {num_classes} classes")
        if len(idx) and (idx.min() < 0 or idx.max() >= n_ckpt):
            raise ValueError(f"class_index out of range for a checkpoint classifier of {n_ckpt} classes")
        out[HEAD_WEIGHT] = out[HEAD_WEIGHT][idx].clone()
        if HEAD_BIAS in out:
            out[HEAD_BIAS] = out[HEAD_BIAS][idx].clone()
    return out


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
