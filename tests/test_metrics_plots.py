"""flaxnets.metrics (per-class table from a confusion matrix) and flaxnets.plots.plot_samples."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flaxnets.metrics import (CSV_COLUMNS, confusion_matrix, per_class, per_class_csv,
                              per_class_text, write_per_class)
from flaxnets.plots import plot_samples

# The note's cat/dog example: 10 cats (7 right), 30 dogs (20 right), rows true, columns predicted.
CAT_DOG = np.array([[7.0, 3.0], [10.0, 20.0]])  # float, as the note accumulates it


def test_the_notes_cat_dog_example():
    pc = per_class(CAT_DOG)
    np.testing.assert_array_equal(pc.support, [10, 30])
    np.testing.assert_array_equal(pc.correct, [7, 20])
    np.testing.assert_array_equal(pc.predicted, [17, 23])
    np.testing.assert_allclose(pc.recall, [7 / 10, 20 / 30])
    np.testing.assert_allclose(pc.precision, [7 / 17, 20 / 23])
    assert pc.accuracy == pytest.approx(27 / 40)
    assert per_class_text(CAT_DOG, ["cat", "dog"]).splitlines() == [
        "class:cat       , total num:10    , correct num:7      Recall: 70.00% Precision: 41.18%",
        "class:dog       , total num:30    , correct num:20     Recall: 66.67% Precision: 86.96%",
    ]


def test_classes_never_predicted_or_absent_are_nan_empty_and_na():
    # a: all 5 right; b: never predicted (its 3 go to a and c); c: predicted, never a true label
    cm = [[5, 0, 0], [1, 0, 2], [0, 0, 0]]
    pc = per_class(cm)
    np.testing.assert_allclose(pc.recall, [1.0, 0.0, np.nan])
    np.testing.assert_allclose(pc.precision, [5 / 6, np.nan, 0.0])
    rows = list(csv.DictReader(io.StringIO(per_class_csv(cm, ["a", "b", "c"]))))
    assert [r["precision"] for r in rows] == ["0.833333", "", "0.000000"]
    assert [r["recall"] for r in rows] == ["1.000000", "0.000000", ""]
    assert [r["predicted"] for r in rows] == ["6", "0", "2"]
    text = per_class_text(cm, ["a", "b", "c"]).splitlines()
    assert text[1].endswith("Recall: 0.00% Precision: n/a")
    assert text[2].endswith("Recall: n/a Precision: 0.00%")


def test_write_per_class_writes_the_csv_and_returns_the_text(tmp_path):
    names = ["T-shirt/top", "Bag, large"]  # longer than the note's 10 columns; a comma to quote
    cm = np.array([[3, 1], [0, 4]])
    text = write_per_class(cm, names, tmp_path / "per_class.csv")
    assert text == per_class_text(cm, names)
    assert text.splitlines()[0].startswith("class:T-shirt/top, total num:4 ")
    assert text.splitlines()[1].startswith("class:Bag, large , total num:4 ")
    with open(tmp_path / "per_class.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(CSV_COLUMNS)
    assert rows[1:] == [["T-shirt/top", "4", "3", "3", "0.750000", "1.000000"],
                        ["Bag, large", "4", "4", "5", "1.000000", "0.800000"]]


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 4)
    np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert cm.dtype == np.int64
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix(np.array([0, 4]), np.array([0, 1]), 4)
    with pytest.raises(ValueError, match="2 labels but 3 predictions"):
        confusion_matrix(np.array([0, 1]), np.array([0, 1, 1]), 4)


@pytest.mark.parametrize("cm, names, message", [
    (np.zeros((2, 3)), ["a", "b"], "square"),
    (np.eye(2), ["a", "b", "c"], "3 class names for a 2x2"),
    (np.array([[1.5, 0], [0, 1]]), ["a", "b"], "whole counts"),
    (np.array([[-1, 0], [0, 1]]), ["a", "b"], "whole counts"),
])
def test_bad_confusion_matrices_are_refused(cm, names, message):
    with pytest.raises(ValueError, match=message):
        per_class_csv(cm, names)


def _red_pixels(path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(np.sum((rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)))


def _gray_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def test_samples_grid_of_gray_images_marks_only_wrong_predictions(tmp_path):
    x, labels = _gray_images(32), np.arange(32) % 10
    names = [f"class {i}" for i in range(10)]
    right = plot_samples(x, labels, labels, names, tmp_path / "right.png", n=32)
    preds = labels.copy()
    preds[[3, 17]] = (preds[[3, 17]] + 1) % 10
    wrong = plot_samples(x, labels, preds, names, tmp_path / "samples.png", n=32)
    with Image.open(wrong) as im:
        im.verify()
    with Image.open(wrong) as im:
        assert im.format == "PNG" and 1000 <= im.width <= 1600 and 600 <= im.height <= 1000
    assert _red_pixels(right) == 0
    assert _red_pixels(wrong) > 500  # two red frames and two red titles


def test_samples_two_rgb_classes_fewer_images_than_columns(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    path = plot_samples(x, np.array([0, 1, 0, 1, 1]), np.array([0, 1, 1, 1, 0]),
                        ["airplane", "bird"], tmp_path / "samples.png", n=16)
    with Image.open(path) as im:
        assert im.mode in ("RGB", "RGBA") and 700 <= im.width <= 1000 and 150 <= im.height <= 400


def test_samples_with_a_thousand_long_class_names(tmp_path):
    names = [f"n{i:08d} a rather long imagenet-style class name" for i in range(1000)]
    x = np.random.default_rng(2).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    labels = np.array([0, 1, 998, 999, 500, 42, 7, 7, 123, 456, 789, 999])
    preds = np.roll(labels, 1)
    path = plot_samples(x, labels, preds, names, tmp_path / "samples.png", n=12, cols=6)
    with Image.open(path) as im:
        assert 800 <= im.width <= 1200 and 300 <= im.height <= 600


@pytest.mark.parametrize("images, message", [
    (np.zeros((4, 28, 28, 1), np.float32), "uint8 NHWC"),
    (np.zeros((4, 28, 28), np.uint8), "uint8 NHWC"),
    (np.zeros((4, 28, 28, 2), np.uint8), "uint8 NHWC"),
    (np.zeros((3, 28, 28, 1), np.uint8), "3 images, 4 labels"),
    (np.zeros((0, 28, 28, 1), np.uint8), None),
])
def test_samples_refuse_bad_input(tmp_path, images, message):
    n = len(images) if message is None else 4
    with pytest.raises(ValueError, match=message or "no images"):
        plot_samples(images, np.zeros(n, int), np.zeros(n, int), ["a", "b"], tmp_path / "s.png")


def test_metrics_imports_no_jax_or_torch():
    # the PyTorch engine and evaluate.py import it; it must not pull in either framework
    code = "import sys, flaxnets.metrics; print(sorted({'jax', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
