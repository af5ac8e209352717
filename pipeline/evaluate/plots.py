"""PNG plots of an evaluation: reliability diagram, and confusion matrix or per-class accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Beyond this many classes a confusion matrix is unreadable; plot sorted per-class accuracy instead.
MAX_CONFUSION_CLASSES = 50


def _plt():
    # lazy: matplotlib only when plotting, with the Agg backend chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: once the backend is chosen

    return plt


def reliability_diagram(rel: dict, ece: float, path: str | Path, title: str = "") -> Path:
    plt = _plt()
    edges = np.asarray(rel["bin_edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    count = np.asarray(rel["count"])
    acc = np.where(count > 0, rel["accuracy"], 0.0)
    conf = np.where(count > 0, rel["confidence"], 0.0)
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(centers, acc, width=width * 0.95, color="tab:blue", edgecolor="k", label="accuracy")
    ax.bar(centers, conf - acc, bottom=acc, width=width * 0.95, color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} reliability (ECE {ece:.3f})".strip())
    ax.legend(loc="upper left", fontsize=8)
    axc.bar(centers, count, width=width * 0.95, color="gray")
    axc.set_xlabel("confidence")
    axc.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def confusion_or_per_class(confusion: np.ndarray, classes: list[str] | None, path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (up to 50 classes), else per-class accuracy sorted."""
    plt = _plt()
    n = confusion.shape[0]
    support = confusion.sum(1, keepdims=True)
    norm = confusion / np.maximum(support, 1)
    if n <= MAX_CONFUSION_CLASSES:
        fig, ax = plt.subplots(figsize=(1.2 + 0.35 * n, 1 + 0.35 * n))
        im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        labels = classes if classes and len(classes) == n else [str(i) for i in range(n)]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if confusion[i, j]:
                        ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6,
                                color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} confusion matrix".strip())
        fig.colorbar(im, ax=ax, fraction=0.046)
    else:
        acc = np.sort(np.diag(norm))
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(np.arange(n), acc, lw=1)
        ax.set_xlabel("class (sorted by accuracy)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(f"{title} per-class accuracy (mean {acc.mean():.3f}, worst {acc[0]:.3f})".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
