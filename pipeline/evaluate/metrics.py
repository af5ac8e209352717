"""Classification metrics accumulated batch by batch (memory does not grow with the split).

Top-1/top-5, mean cross-entropy (no label smoothing: the loss a user would compare),
per-class accuracy, the confusion matrix and the expected calibration error (ECE, 15
equal-width confidence bins, Guo et al. 2017), plus the per-sample top-k predictions so a
later run (e.g. a model loaded back from the registry) can be compared sample by sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


@dataclass
class MetricAccumulator:
    num_classes: int
    topk: int = 5
    bins: int = ECE_BINS
    n: int = 0
    correct1: int = 0
    correctk: int = 0
    loss_sum: float = 0.0
    confusion: np.ndarray = field(init=False)
    bin_count: np.ndarray = field(init=False)
    bin_conf: np.ndarray = field(init=False)
    bin_acc: np.ndarray = field(init=False)
    preds: list[np.ndarray] = field(default_factory=list)
    confs: list[np.ndarray] = field(default_factory=list)
    forward_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.topk = min(self.topk, self.num_classes)
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.bin_count = np.zeros(self.bins, dtype=np.int64)
        self.bin_conf = np.zeros(self.bins, dtype=np.float64)
        self.bin_acc = np.zeros(self.bins, dtype=np.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.detach().float().cpu()
        labels = labels.detach().long().cpu()
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (B, {self.num_classes}), got {tuple(logits.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels outside [0, {self.num_classes}) in this batch")
        probs = logits.softmax(-1)
        conf, pred = probs.max(-1)
        top = logits.topk(self.topk, -1).indices
        hit1 = pred.eq(labels)
        self.n += len(labels)
        self.correct1 += int(hit1.sum())
        self.correctk += int(top.eq(labels[:, None]).any(-1).sum())
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        np.add.at(self.confusion, (labels.numpy(), pred.numpy()), 1)
        b = np.minimum((conf.numpy() * self.bins).astype(np.int64), self.bins - 1)
        np.add.at(self.bin_count, b, 1)
        np.add.at(self.bin_conf, b, conf.numpy().astype(np.float64))
        np.add.at(self.bin_acc, b, hit1.numpy().astype(np.float64))
        self.preds.append(top.numpy().astype(np.int32))
        self.confs.append(conf.numpy().astype(np.float32))

    def per_class_accuracy(self) -> np.ndarray:
        support = self.confusion.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(support > 0, np.diag(self.confusion) / np.maximum(support, 1), np.nan)

    def ece(self) -> float:
        if self.n == 0:
            return float("nan")
        gap = np.abs(self.bin_acc - self.bin_conf)  # sums: |sum acc - sum conf| per bin
        return float(gap.sum() / self.n)

    def reliability(self) -> dict[str, list[float]]:
        """Per-bin mean confidence, accuracy and count (for the reliability diagram)."""
        cnt = np.maximum(self.bin_count, 1)
        return {
            "bin_edges": np.linspace(0, 1, self.bins + 1).tolist(),
            "confidence": (self.bin_conf / cnt).tolist(),
            "accuracy": (self.bin_acc / cnt).tolist(),
            "count": self.bin_count.tolist(),
        }

    def summary(self) -> dict:
        if self.n == 0:
            raise ValueError("no samples were evaluated")
        pca = self.per_class_accuracy()
        out = {
            "num_samples": self.n,
            "top1": self.correct1 / self.n,
            f"top{self.topk}": self.correctk / self.n,
            "loss": self.loss_sum / self.n,
            "ece": self.ece(),
            "mean_per_class_accuracy": float(np.nanmean(pca)) if np.isfinite(pca).any() else float("nan"),
            "per_class_accuracy": [None if np.isnan(a) else float(a) for a in pca],
            "reliability": self.reliability(),
        }
        if self.forward_seconds > 0:
            out["throughput_img_s"] = self.n / self.forward_seconds
        return out

    def predictions(self) -> tuple[np.ndarray, np.ndarray]:
        """(top-k indices (N, k) int32, top-1 confidence (N,) float32) in evaluation order."""
        if not self.preds:
            return np.zeros((0, self.topk), np.int32), np.zeros((0,), np.float32)
        return np.concatenate(self.preds), np.concatenate(self.confs)
