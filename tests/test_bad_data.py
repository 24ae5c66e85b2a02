"""Bad data (corrupt files, degenerate datasets) is one DataError or FileNotFoundError line that
names the file or directory and the problem, and train.py turns it into one `error:` line."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flaxnets import data
from flaxnets.data import (DataError, Dataset, check_dataset, load_cifar_pickles, load_dataset,
                           load_image_folder, read_idx, write_idx)
from tests.test_data import _write_idx_dir

# appended, not put first: scripts/parity.py would hide the parity package from later imports
sys.path.append(str(Path(__file__).resolve().parents[1] / "scripts"))
import train as train_script  # noqa: E402  (scripts/train.py)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXNETS_CACHE", str(tmp_path / "cache"))


def _one_line(err: pytest.ExceptionInfo, *parts: object) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert str(part) in msg, (part, msg)
    return msg


def _image_folder(root: Path, classes=("a", "b"), n=3) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
            Image.fromarray(pixels).save(root / c / f"{i}.jpg", quality=90)
    return root


def _cifar_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
                         b"labels": [0, 2, 1, 0, 2, 3]}, f)
    return root


def _cut(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])


def _train_cli(capsys, net: str, data_dir: Path, out: Path) -> str:
    """Run scripts/train.py in-process; it must fail with exactly one `error:` line."""
    capsys.readouterr()
    rc = train_script.main(["--net", net, "--data-dir", str(data_dir), "--epochs", "1",
                            "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1, captured
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "epoch" not in captured.out and "final test accuracy" not in captured.out
    assert not (out / "model.pt").exists() and not (out / "metrics.csv").exists()
    return lines[0]


# --------------------------------------------------------------------------- image files
@pytest.mark.parametrize("spoil, problem", [
    (lambda p: p.write_bytes(os.urandom(300)), "not an image file"),
    (lambda p: p.write_text("just some notes\n"), "not an image file"),
    (lambda p: p.write_bytes(b""), "not an image file"),
    (_cut, "image file is truncated"),
], ids=["random-bytes", "text", "empty", "truncated-png"])
def test_a_corrupt_png_is_one_line_naming_it(tmp_path, spoil, problem):
    root = _image_folder(tmp_path / "imgs")
    spoil(root / "b" / "1.png")
    with pytest.raises(DataError) as err:
        load_dataset("image_folder", root, size=(16, 16), use_cache=False)
    _one_line(err, root / "b" / "1.png", "cannot read the image", problem)


def test_a_truncated_jpeg_is_not_read_half_grey(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # PIL's default
    root = _image_folder(tmp_path / "imgs")
    _cut(root / "a" / "2.jpg")
    with pytest.raises(DataError) as err:
        load_image_folder(root, (16, 16))
    _one_line(err, root / "a" / "2.jpg", "image file is truncated")


def test_a_directory_named_like_an_image_is_one_line(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    (root / "a" / "folder.png").mkdir()
    with pytest.raises(DataError) as err:
        load_image_folder(root, (16, 16))
    _one_line(err, root / "a" / "folder.png", "cannot read the image")


def test_an_unlistable_class_folder_is_one_line(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "imgs")
    listdir = Path.iterdir

    def iterdir(self):  # chmod 000 does not stop root, so refuse the listing here
        if self == root / "b":
            raise PermissionError(13, "Permission denied", str(self))
        return listdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DataError) as err:
        load_image_folder(root, (16, 16))
    assert _one_line(err) == f"cannot list {root / 'b'}: Permission denied"


def test_cli_corrupt_image_is_one_error_line(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs")
    (root / "a" / "0.png").write_text("not a picture")
    line = _train_cli(capsys, "net", root, tmp_path / "run")
    assert str(root / "a" / "0.png") in line and "cannot read the image" in line


# --------------------------------------------------------------------------- IDX files
def test_a_text_file_named_gz_is_one_line(tmp_path):
    root = tmp_path / "fm"
    _write_idx_dir(root)
    (root / "train-images-idx3-ubyte.gz").write_text("<html>404 not found</html>\n")
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", root, use_cache=False)
    _one_line(err, root / "train-images-idx3-ubyte.gz", "gzipped IDX", "Not a gzipped file")


def test_a_truncated_gz_is_one_line(tmp_path):
    root = tmp_path / "fm"
    _write_idx_dir(root)
    _cut(root / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", root, use_cache=False)
    _one_line(err, root / "t10k-images-idx3-ubyte.gz", "Compressed file ended")


def test_a_truncated_raw_idx_is_one_line(tmp_path):
    root = tmp_path / "fm"
    _write_idx_dir(root, gz=False)
    _cut(root / "train-images-idx3-ubyte", 0.9)
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", root, use_cache=False)
    _one_line(err, root / "train-images-idx3-ubyte", "header says shape (12, 28, 28)")


@pytest.mark.parametrize("raw, problem", [
    (bytes([0, 0, 8, 3]) + (2**32 - 1).to_bytes(4, "big") * 3 + bytes(100),
     "header says shape (4294967295, 4294967295, 4294967295) but the file holds 100 data bytes"),
    (bytes([0, 0, 8, 3]) + bytes(4), "the IDX header of 3 dimensions is cut short (8 bytes)"),
], ids=["absurd-dims", "cut-header"])
def test_a_bad_idx_header_is_one_line(tmp_path, raw, problem):
    (tmp_path / "x").write_bytes(raw)
    with pytest.raises(DataError) as err:
        read_idx(tmp_path / "x")
    _one_line(err, tmp_path / "x", problem)


def test_idx_images_that_are_not_bytes_are_one_line(tmp_path):
    root = tmp_path / "fm"
    _write_idx_dir(root)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:  # IDX type 0x0D: float32
        f.write(bytes([0, 0, 0x0D, 3]) + b"".join(d.to_bytes(4, "big") for d in (12, 28, 28))
                + np.zeros((12, 28, 28), ">f4").tobytes())
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", root, use_cache=False)
    _one_line(err, root / "train-images-idx3-ubyte.gz", "stored as >f4, expected unsigned bytes")


def test_cli_corrupt_idx_is_one_error_line(tmp_path, capsys):
    root = tmp_path / "fm"
    _write_idx_dir(root)
    _cut(root / "train-labels-idx1-ubyte.gz")
    line = _train_cli(capsys, "lenet", root, tmp_path / "run")
    assert str(root / "train-labels-idx1-ubyte.gz") in line and "Compressed file ended" in line


# --------------------------------------------------------------------------- CIFAR-10 batches
@pytest.mark.parametrize("spoil, problem", [
    (_cut, "cannot unpickle it: pickle data was truncated"),
    (lambda p: p.write_text("hello world\n"), "cannot unpickle it"),
    (lambda p: p.write_bytes(b""), "cannot unpickle it: Ran out of input"),
    (lambda p: p.write_bytes(pickle.dumps({b"labels": [1, 2]})), "no b'data' and b'labels'"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), "no b'data' and b'labels'"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((6, 3000), np.uint8),
                                           b"labels": [0] * 6})),
     "18000 data bytes and 6 labels do not make 32x32x3 images"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((6, 3072), np.uint8),
                                           b"labels": [0] * 5})),
     "18432 data bytes and 5 labels"),
], ids=["truncated", "text", "empty", "no-data", "a-list", "odd-size", "label-count"])
def test_a_bad_cifar_batch_is_one_line_naming_it(tmp_path, spoil, problem):
    root = _cifar_dir(tmp_path / "cifar-10-batches-py")
    spoil(root / "data_batch_3")
    with pytest.raises(DataError) as err:
        load_cifar_pickles(tmp_path)
    _one_line(err, root / "data_batch_3", problem)


def test_a_missing_cifar_batch_names_it(tmp_path):
    root = _cifar_dir(tmp_path / "cifar-10-batches-py")
    (root / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", tmp_path, use_cache=False)
    _one_line(err, root / "data_batch_4", "is missing")


def test_cli_truncated_cifar_batch_is_one_error_line(tmp_path, capsys):
    root = _cifar_dir(tmp_path / "cifar-10-batches-py")
    _cut(root / "test_batch")
    line = _train_cli(capsys, "net", tmp_path, tmp_path / "run")
    assert str(root / "test_batch") in line and "pickle data was truncated" in line


# --------------------------------------------------------------------------- degenerate data
def _idx_with_labels(root: Path, train_labels) -> Path:
    _write_idx_dir(root, n_train=len(train_labels))
    write_idx(root / "train-labels-idx1-ubyte.gz", np.asarray(train_labels, np.uint8))
    return root


def test_one_class_training_data_is_refused(tmp_path):
    root = _idx_with_labels(tmp_path / "fm", [3] * 40)
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", root, use_cache=False)
    assert _one_line(err) == (f"{root}: the training split holds 1 class ('Dress'); "
                              "a classifier needs at least 2")


def test_a_one_class_image_folder_is_refused(tmp_path):
    root = _image_folder(tmp_path / "imgs", classes=("cat",))
    with pytest.raises(DataError) as err:
        load_dataset("image_folder", root, size=(8, 8), use_cache=False)
    _one_line(err, root, "holds 1 class ('cat')", "needs at least 2")


def test_an_empty_training_split_is_refused(tmp_path):
    root = _idx_with_labels(tmp_path / "fm", [])
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", root, use_cache=False)
    assert _one_line(err) == f"{root}: the training split holds no images"


def test_negative_labels_are_named_with_their_split(tmp_path):
    root = tmp_path / "fm"
    _write_idx_dir(root)
    labels = np.array([0, -1, 2, -3, -1], np.int8)  # IDX type 0x09: signed bytes
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 0x09, 1]) + (5).to_bytes(4, "big") + labels.tobytes())
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", root, use_cache=False)
    assert _one_line(err) == f"{root}: test split: labels outside [0, 10) (10 class names): -3, -1"


def _ds(**kw) -> Dataset:
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (6, 4, 4, 1), dtype=np.uint8),
                  y_train=np.array([0, 1, 0, 1, 0, 1], np.int32),
                  x_test=np.zeros((0, 4, 4, 1), np.uint8), y_test=np.zeros(0, np.int32))
    arrays.update(kw)
    return Dataset(**arrays, class_names=["a", "b"], source="/data/here")


@pytest.mark.parametrize("change, problem", [
    (dict(y_train=np.array([0, 1, 0, 1, 2, 7], np.int32)),
     "train split: labels outside [0, 2) (2 class names): 2, 7"),
    (dict(y_train=np.array([0, 1, 0], np.int32)), "train split: 6 images but 3 labels"),
    (dict(x_train=np.zeros((6, 4, 4, 1), np.float32)), "train split: images are float32, expected uint8"),
    (dict(x_train=np.zeros((6, 4, 4), np.uint8)), "train split: images have shape (6, 4, 4), expected 4-D"),
    (dict(y_train=np.zeros(6, np.float32)), "train split: labels are float32 of shape (6,)"),
    (dict(x_test=np.zeros((2, 5, 5, 1), np.uint8), y_test=np.zeros(2, np.int32)),
     "test images are (5, 5, 1) but training images (4, 4, 1)"),
], ids=["label-range", "length", "dtype", "rank", "float-labels", "test-shape"])
def test_check_dataset_names_the_problem(change, problem):
    with pytest.raises(DataError) as err:
        check_dataset(_ds(**change))
    assert _one_line(err).startswith(f"/data/here: {problem}")


def test_an_empty_test_split_is_fine():
    check_dataset(_ds())  # 'split the training set'
    check_dataset(_ds(x_test=np.zeros((2, 4, 4, 1), np.uint8), y_test=np.zeros(2, np.int32)))


def test_an_image_folder_whose_test_folder_is_empty_names_it(tmp_path):
    root = tmp_path / "imgs"
    _image_folder(root / "train")
    (root / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        load_dataset("image_folder", root, size=(8, 8), use_cache=False)
    _one_line(err, f"{root / 'test'} holds no images")


def test_a_degenerate_cache_entry_is_refused_too(tmp_path):
    root = _idx_with_labels(tmp_path / "fm", [0, 1] * 20)
    good = load_dataset("fashion_mnist", root)
    (entry,) = (tmp_path / "cache").iterdir()
    data._save_npz(entry, Dataset(good.x_train, np.zeros_like(good.y_train), good.x_test,
                                  good.y_test, good.class_names, good.source))
    with pytest.raises(DataError, match="holds 1 class"):
        load_dataset("fashion_mnist", root)


def test_a_broken_symlink_in_the_data_dir_does_not_break_the_cache_key(tmp_path):
    root = tmp_path / "fm"
    _write_idx_dir(root)
    (root / "stale-link").symlink_to(tmp_path / "gone")
    assert len(load_dataset("fashion_mnist", root).x_train) == 12


def test_cli_one_class_data_trains_nothing(tmp_path, capsys):
    root = _idx_with_labels(tmp_path / "fm", [5] * 40)
    line = _train_cli(capsys, "lenet", root, tmp_path / "run")
    assert line == f"error: {root}: the training split holds 1 class ('Sandal'); a classifier needs at least 2"


# --------------------------------------------------------------------------- the local-copy note
def test_the_local_copy_note_is_said_once_and_only_after_a_good_load(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "_tfds_available", lambda: False)
    data._note_once.cache_clear()
    bad = _idx_with_labels(tmp_path / "bad", [1] * 10)
    monkeypatch.setattr(data, "LOCAL_FASHION_MNIST", bad)
    with pytest.raises(DataError):
        load_dataset("fashion_mnist", use_cache=False)
    assert "local copy" not in capsys.readouterr().err
    good = tmp_path / "good"
    _write_idx_dir(good)
    monkeypatch.setattr(data, "LOCAL_FASHION_MNIST", good)
    for _ in range(3):
        load_dataset("fashion_mnist")  # a fresh load, then the cache twice
    assert capsys.readouterr().err.splitlines() == [
        f"tensorflow-datasets is not installed; using the local copy {good}"]
