"""State-dict helpers: key names, wrapper prefixes, and fitting a checkpoint to a model's shapes.

A leaf of the package (torch and the config only), so that the model's load hook and the public
``coatnet.adapt`` functions share it without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coatnet.config import CoAtNetConfig

TABLE_SUFFIX = "rel_bias.table"
HEAD_WEIGHT, HEAD_BIAS = "head.fc.weight", "head.fc.bias"
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


def param_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Each parameter's full shape, also under ZeRO-3 (which leaves partitioned parameters empty)."""
    # ds_shape: DeepSpeed ZeRO-3 keeps the real shape of a partitioned parameter there
    return {n: getattr(p, "ds_shape", p.shape) for n, p in model.named_parameters()}


def check_head_args(head: str, class_index: Sequence[int] | torch.Tensor | None) -> None:
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    if (head == "select") != (class_index is not None):
        raise ValueError("class_index goes with head='select' (and head='select' needs class_index)")


def adapt_to_shapes(
    state_dict: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size],
    cfg: CoAtNetConfig,
    num_classes: int,
    *,
    head: str = "keep",
    class_index: Sequence[int] | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``coatnet.adapt_state_dict`` once the target is known by its parameter shapes, config and class count."""
    check_head_args(head, class_index)
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
