"""Training plots (loss/accuracy curves, confusion matrix) with matplotlib, imported lazily (Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics: list[dict[str, Any]], path: str | Path, eval_split: str = "test") -> Path:
    """Two panels, loss and accuracy vs epoch, train vs ``eval_split`` ('val' or 'test')."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what in zip(axes, ("loss", "acc")):
        ax.plot(epochs, [m[f"train_{what}"] for m in metrics], "o-", label="train")
        ax.plot(epochs, [m[f"{eval_split}_{what}"] for m in metrics], "s-", label=eval_split)
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
