"""Classification losses: softmax cross-entropy and the paper's sigmoid loss for ImageNet-21K.

Both take integer labels or soft targets (rows summing to 1, from MixUp/CutMix). Called as ``loss(logits,
target)`` they are the mean over the batch; ``loss(logits, target, weight, normaliser)`` is
``sum(weight * per-sample loss) / normaliser``: the trainer weighs masked samples (``data.py``) 0 and
passes the step's kept samples as the normaliser (``step.py``), so that every kept sample of an optimizer
step weighs the same, whichever micro-batch and rank it landed on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train.config import LossConfig


def weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor | None,
                  normaliser: torch.Tensor | float | None) -> torch.Tensor:
    """``per_sample.mean()`` without a weight, else ``sum(weight * per_sample) / normaliser``."""
    if weight is None:
        return per_sample.mean()
    return (per_sample * weight.to(per_sample.dtype)).sum() / normaliser


class SoftmaxCrossEntropy(nn.Module):
    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if target.ndim == 1:
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing, reduction="none")
        n = logits.shape[-1]
        target = target.float() * (1.0 - self.label_smoothing) + self.label_smoothing / n
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                normaliser: torch.Tensor | float | None = None) -> torch.Tensor:
        if weight is None and target.ndim == 1:  # the fused mean, as before weights existed
            return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        return weighted_mean(self.per_sample(logits, target), weight, normaliser)


class SigmoidBinaryCrossEntropy(nn.Module):
    """Per-class sigmoid BCE, summed over classes and averaged over the batch.

    Summing over classes (big_vision's ``sigmoid_xent``) keeps the gradient of the true class
    independent of the number of classes; a mean would shrink it 21,841-fold on ImageNet-21K.
    Label smoothing moves ``eps`` of the mass uniformly, as for the softmax loss.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        n = logits.shape[-1]
        if target.ndim == 1:
            target = F.one_hot(target, n)
        target = target.float() * (1.0 - self.label_smoothing) + self.label_smoothing / n
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                normaliser: torch.Tensor | float | None = None) -> torch.Tensor:
        return weighted_mean(self.per_sample(logits, target), weight, normaliser)


def build_loss(cfg: LossConfig) -> nn.Module:
    if cfg.type == "sigmoid":
        return SigmoidBinaryCrossEntropy(cfg.label_smoothing)
    return SoftmaxCrossEntropy(cfg.label_smoothing)
