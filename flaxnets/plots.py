"""Run pictures (loss/accuracy curves, confusion matrix, sample grid) with matplotlib, lazily (Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics: list[dict[str, Any]], path: str | Path, best_epoch: int | None = None) -> Path:
    """Two panels, loss and accuracy vs epoch: train and every evaluated split (val, test);
    ``best_epoch`` (the kept weights of a validating recipe) is marked with a dashed line."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in metrics]
    splits = [s for s in ("train", "val", "test") if f"{s}_loss" in metrics[0]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what in zip(axes, ("loss", "acc")):
        for split, marker in zip(splits, "os^"):
            ax.plot(epochs, [m[f"{split}_{what}"] for m in metrics], f"{marker}-", label=split)
        if best_epoch:
            ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label="kept (best val)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("cross-entropy loss" if what == "loss" else "accuracy")
        ax.set_title("loss" if what == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: str | Path,
                   title: str = "") -> Path:
    """A labelled heatmap of counts (rows: true class, columns: predicted class)."""
    plt = _pyplot()
    cm = np.asarray(confusion)
    k = len(class_names)
    size = max(4.0, 0.6 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    if k <= 30:  # numbers stay legible only for small matrices
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > thresh else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _short(name: str, limit: int = 16) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def plot_samples(images: np.ndarray, labels: np.ndarray, preds: np.ndarray, class_names: list[str],
                 path: str | Path, n: int = 32, cols: int = 8) -> Path:
    """A grid of the first ``n`` images (uint8 NHWC) titled true / predicted; wrong ones in red.

    One-channel images are drawn in gray. Long class names are shortened so 1000-class labels fit.
    """
    images, labels, preds = np.asarray(images), np.asarray(labels), np.asarray(preds)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 NHWC with 1 or 3 channels, got {images.dtype} "
                         f"{images.shape}")
    if not len(images) == len(labels) == len(preds):
        raise ValueError(f"{len(images)} images, {len(labels)} labels, {len(preds)} predictions")
    n = min(n, len(images))
    if n == 0:
        raise ValueError("no images to plot")
    plt = _pyplot()
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 2.0 * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.set_axis_off()
            continue
        img = images[k]
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img)
        wrong = int(labels[k]) != int(preds[k])
        color = "red" if wrong else "black"
        true, pred = (_short(class_names[int(v[k])]) for v in (labels, preds))
        ax.set_title(f"true {true}\npred {pred}", fontsize=8, color=color,
                     fontweight="bold" if wrong else "normal")
        for spine in ax.spines.values():  # a red frame makes errors findable at a glance
            spine.set_edgecolor(color)
            spine.set_linewidth(2.5 if wrong else 0.5)
    n_wrong = int(np.sum(labels[:n] != preds[:n]))
    fig.suptitle(f"{n} test images: {n_wrong} misclassified (red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
