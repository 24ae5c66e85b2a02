"""Per-class evaluation from a confusion matrix, numpy only, so the JAX and PyTorch engines share it.

Confusion matrices have rows = true class, columns = predicted class (``FitResult.confusion``).
An undefined ratio (precision of a class never predicted, recall of a class absent from the
labels) is NaN in the arrays, an empty field in the CSV and ``n/a`` in the printout.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CSV_COLUMNS = ("class", "support", "correct", "predicted", "recall", "precision")


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs as an int64 (num_classes, num_classes) matrix."""
    labels, preds = np.asarray(labels).ravel(), np.asarray(preds).ravel()
    if labels.shape != preds.shape:
        raise ValueError(f"{labels.size} labels but {preds.size} predictions")
    for what, v in (("label", labels), ("prediction", preds)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{what} outside 0..{num_classes - 1}: {v.min()}..{v.max()}")
    flat = labels.astype(np.int64) * num_classes + preds.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class PerClass:
    """Per-class counts and ratios; ``recall``/``precision`` are NaN where undefined."""

    support: np.ndarray  # true examples of the class (row sums)
    correct: np.ndarray  # the diagonal
    predicted: np.ndarray  # examples predicted as the class (column sums)
    recall: np.ndarray
    precision: np.ndarray

    @property
    def accuracy(self) -> float:
        """Overall accuracy (trace / total); NaN for an empty matrix."""
        total = self.support.sum()
        return float(self.correct.sum() / total) if total else float("nan")


def _counts(confusion: np.ndarray, num_names: int | None = None) -> np.ndarray:
    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {cm.shape}")
    if num_names is not None and num_names != cm.shape[0]:
        raise ValueError(f"{num_names} class names for a {cm.shape[0]}x{cm.shape[0]} confusion matrix")
    # the material accumulates counts in a float matrix; accept that, but only whole counts
    if cm.size and (np.any(cm < 0) or np.any(cm != np.round(cm))):
        raise ValueError("a confusion matrix holds non-negative whole counts")
    return cm.astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class(confusion: np.ndarray) -> PerClass:
    """Support, correct, predicted, recall (diag / row sum) and precision (diag / column sum)."""
    cm = _counts(confusion)
    support, predicted, correct = cm.sum(1), cm.sum(0), np.diag(cm).copy()
    return PerClass(support, correct, predicted, _ratio(correct, support), _ratio(correct, predicted))


def _pct(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.2%}"


def per_class_text(confusion: np.ndarray, class_names: list[str]) -> str:
    """The material's verbose print, one line per class (exact ratios: no +0.1 in the denominators)."""
    cm = _counts(confusion, len(class_names))
    pc = per_class(cm)
    width = max([10, *map(len, class_names)])  # the note's {:<10}, widened for longer names
    return "\n".join(
        f"class:{name:<{width}}, total num:{pc.support[i]:<6}, correct num:{pc.correct[i]:<5}  "
        f"Recall: {_pct(pc.recall[i])} Precision: {_pct(pc.precision[i])}"
        for i, name in enumerate(class_names))


def per_class_csv(confusion: np.ndarray, class_names: list[str]) -> str:
    """The per-class table as CSV text (CSV_COLUMNS; ratios to 6 decimals, empty where undefined)."""
    cm = _counts(confusion, len(class_names))
    pc = per_class(cm)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for i, name in enumerate(class_names):
        w.writerow([name, pc.support[i], pc.correct[i], pc.predicted[i],
                    *("" if np.isnan(v) else f"{v:.6f}" for v in (pc.recall[i], pc.precision[i]))])
    return buf.getvalue()


def write_per_class(confusion: np.ndarray, class_names: list[str], path: str | Path) -> str:
    """Write ``per_class.csv`` to ``path`` and return the printable per-class text."""
    Path(path).write_text(per_class_csv(confusion, class_names))
    return per_class_text(confusion, class_names)
