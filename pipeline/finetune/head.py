"""Initialising the fine-tuning classifier from the pretraining one.

``select`` (default): each fine-tuning class takes the row of "its" pretraining class, the
first of its children in label order. For ImageNet that is the same synset in the 21K list
(timm's synset orderings); for the digits demo the children of digit ``d`` are its rotations
``d_r000, d_r090, ...`` and the first is the upright one, which is what the 10-class
fine-tuning images show. Picking one row keeps the pretrained logit of exactly that class;
averaging (``mean``) would blend the logits of visually different rotated classes.
``mean``: the average of all children's rows. ``zero``: a fresh zero-initialised head
(big_vision), which starts from uniform predictions.

A fine-tuning class with no pretraining counterpart (e.g. 1K's n04399382 in fall11) gets a
zero row and zero bias, and is reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from coatnet.state_dict import HEAD_BIAS, HEAD_WEIGHT

HEAD_MODES = ("select", "mean", "zero")


@dataclass(frozen=True)
class HeadInit:
    mode: str
    num_classes: int
    source_classes: int
    rows: list[list[int]]  # for each fine-tuning class, the pretraining rows used
    unmatched: list[str]  # fine-tuning classes that got a zero row

    def to_dict(self) -> dict:
        d = asdict(self)
        if len(self.rows) > 50:  # keep finetune.json readable for 1K classes
            d["rows"] = f"{sum(len(r) for r in self.rows)} rows for {len(self.rows)} classes"
        return d


def class_children(
    source_classes: Sequence[str],
    target_classes: Sequence[str],
    parent_map: Sequence[int] | Mapping[str, str] | None = None,
    parent_classes: Sequence[str] | None = None,
) -> list[list[int]]:
    """For each fine-tuning class, the pretraining labels that map onto it, in label order.

    With a ``parent_map`` (pretraining label -> fine-tuning label, or name -> name, as a
    21K-shaped manifest records it) it decides; otherwise classes match by name (synset).
    """
    target_index = {c: i for i, c in enumerate(target_classes)}
    children: list[list[int]] = [[] for _ in target_classes]
    if parent_map is not None:
        if isinstance(parent_map, Mapping):
            src_index = {c: i for i, c in enumerate(source_classes)}
            pairs = [(src_index[s], t) for s, t in parent_map.items() if s in src_index]
        else:
            if len(parent_map) != len(source_classes):
                raise ValueError(f"parent_map has {len(parent_map)} entries, the source {len(source_classes)} classes")
            pairs = list(enumerate(parent_map))
        for s, t in sorted(pairs):
            # An integer parent is a label of parent_classes; translate it to the target's order by name.
            name = (parent_classes[t] if parent_classes is not None else target_classes[t]) if isinstance(t, int) else t
            if name in target_index:
                children[target_index[name]].append(s)
        return children
    src_index = {c: i for i, c in enumerate(source_classes)}
    for t, name in enumerate(target_classes):
        if name in src_index:
            children[t].append(src_index[name])
    return children


def init_head(
    state_dict: Mapping[str, torch.Tensor],
    children: Sequence[Sequence[int]],
    mode: str = "select",
    target_classes: Sequence[str] | None = None,
    keys: tuple[str, str] = (HEAD_WEIGHT, HEAD_BIAS),
) -> tuple[dict[str, torch.Tensor], HeadInit]:
    """A copy of ``state_dict`` whose classifier has ``len(children)`` rows, built as ``mode`` says.

    ``keys``: the classifier's weight and bias in the state dict (a CoAtNet's by default; see
    ``pipeline.models.classifier_keys``).
    """
    if mode not in HEAD_MODES:
        raise ValueError(f"head init must be one of {HEAD_MODES}, got {mode!r}")
    weight_key, bias_key = keys
    if weight_key not in state_dict:
        raise ValueError(f"the pretrained weights have no classifier ({weight_key})")
    sd = dict(state_dict)
    w_src = sd[weight_key].float()
    b_src = sd.get(bias_key)
    b_src = torch.zeros(w_src.shape[0]) if b_src is None else b_src.float()
    n, dim = len(children), w_src.shape[1]
    w = torch.zeros(n, dim)
    b = torch.zeros(n)
    used: list[list[int]] = []
    unmatched: list[str] = []
    for t, rows in enumerate(children):
        rows = list(rows)
        if mode == "zero" or not rows:
            used.append([])
            if mode != "zero":
                unmatched.append(target_classes[t] if target_classes else str(t))
            continue
        if min(rows) < 0 or max(rows) >= w_src.shape[0]:
            raise ValueError(f"class {t}: rows {rows} outside the pretrained head of {w_src.shape[0]} classes")
        pick = rows[:1] if mode == "select" else rows
        w[t] = w_src[pick].mean(0)
        b[t] = b_src[pick].mean()
        used.append(pick)
    sd[weight_key], sd[bias_key] = w, b
    return sd, HeadInit(mode, n, int(w_src.shape[0]), used, unmatched)
