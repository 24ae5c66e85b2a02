"""flaxnets.data: IDX files, image folders, CIFAR pickles, tfds (on mock data), the source order,
the cache and the error messages. Nothing here touches the network."""

from __future__ import annotations

import http.server
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from flaxnets import data
from flaxnets.data import (CIFAR10_CLASSES, FASHION_MNIST_CLASSES, Dataset, load_cifar_pickles,
                           load_dataset, load_idx_dir, load_image_folder, read_idx, write_idx)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXNETS_CACHE", str(tmp_path / "cache"))


def _write_idx_dir(root, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / (name + (".gz" if gz else "")), arr)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arrays = _write_idx_dir(tmp_path / "fm", gz=gz)
    ds = load_idx_dir(tmp_path / "fm")
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_train.dtype == np.uint8
    assert ds.y_train.dtype == np.int32 and ds.x_test.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.class_names[0] == "T-shirt/top" and ds.num_classes == 10


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 3), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


def test_idx_dir_missing_file_and_dir(tmp_path):
    _write_idx_dir(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        load_idx_dir(tmp_path / "fm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_idx_dir(tmp_path / "nowhere")


def _png(path, color, mode="RGB", size=(10, 7)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_single_tree(tmp_path):
    for i in range(3):
        _png(tmp_path / "imgs" / "cat" / f"{i}.png", (200, 10, 10))
        _png(tmp_path / "imgs" / "ant" / f"{i}.jpg", (10, 10, 200))
    ds = load_image_folder(tmp_path / "imgs", (16, 12))
    assert ds.class_names == ["ant", "cat"]  # sorted folder names
    assert ds.x_train.shape == (6, 16, 12, 3) and ds.x_test.shape == (0, 16, 12, 3)
    np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1, 1])
    assert ds.x_train[0, 5, 5, 2] > 150 and ds.x_train[3, 5, 5, 0] > 150  # blue ants, red cats


def test_image_folder_train_test_layout(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        for cls, c in (("b", 50), ("a", 250)):
            for i in range(n):
                _png(tmp_path / "r" / split / cls / f"{i}.png", c, mode="L")
    ds = load_image_folder(tmp_path / "r", (8, 8), channels=1)
    assert ds.class_names == ["a", "b"]
    assert ds.x_train.shape == (8, 8, 8, 1) and ds.x_test.shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(ds.y_test, [0, 0, 1, 1])
    assert (ds.x_test[0] == 250).all() and (ds.x_test[-1] == 50).all()


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", (8, 8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        load_image_folder(tmp_path / "empty", (8, 8))
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "noimg", (8, 8))
    _png(tmp_path / "rgb" / "c" / "0.png", (1, 2, 3))
    with pytest.raises(ValueError, match="expected a 1-channel"):
        load_image_folder(tmp_path / "rgb", (8, 8), channels=1)


def test_cifar_pickles_and_cifar2_relabel(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [0, 1, 2, 3, 2, 0]
        x = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": labels}, f)
    ds = load_cifar_pickles(tmp_path)
    assert ds.x_train.shape == (30, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
    with open(root / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert ds.x_test[1, 0, 0, 2] == raw[1, 2 * 1024]  # CHW rows -> HWC, channel 2 at pixel (0, 0)
    c2 = load_dataset("cifar2", tmp_path)
    assert c2.class_names == ["airplane", "bird"]
    np.testing.assert_array_equal(c2.y_test, [0, 1, 1, 0])


def test_load_dataset_caches_atomically(tmp_path, monkeypatch):
    _write_idx_dir(tmp_path / "fm")
    first = load_dataset("fashion_mnist", tmp_path / "fm")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp file left behind
    monkeypatch.setattr(data, "load_idx_dir", lambda *a, **k: pytest.fail("cache not used"))
    second = load_dataset("fashion_mnist", tmp_path / "fm")
    for a in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(first, a), getattr(second, a))
    assert second.class_names == first.class_names and second.source == first.source


def test_missing_data_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "LOCAL_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.setattr(data, "_tfds_available", lambda: False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist")
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_dataset("image_folder")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("fashion_mnist", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist3d")


def test_local_fashion_mnist_fallback(tmp_path, monkeypatch, capsys):
    _write_idx_dir(tmp_path / "fm", n_train=3, n_test=2)
    monkeypatch.setattr(data, "LOCAL_FASHION_MNIST", tmp_path / "fm")
    monkeypatch.setattr(data, "_tfds_available", lambda: False)
    ds = load_dataset("fashion_mnist")
    assert isinstance(ds, Dataset) and len(ds.x_train) == 3
    assert "using the local copy" in capsys.readouterr().err


# --------------------------------------------------------------------------- tensorflow-datasets
def _tfds_state(monkeypatch, prepared, unreachable=None):
    """Pretend tfds has (or lacks) prepared data; a download probe answers ``unreachable``."""
    monkeypatch.setattr(data, "_tfds_prepared", lambda name: prepared)
    monkeypatch.setattr(data, "_tfds_unreachable", lambda name: unreachable)


def test_tfds_fashion_mnist_on_mock_data_comes_before_the_local_copy(tmp_path, monkeypatch, capsys):
    _write_idx_dir(tmp_path / "fm")
    monkeypatch.setattr(data, "LOCAL_FASHION_MNIST", tmp_path / "fm")  # there, but tfds is first
    _tfds_state(monkeypatch, prepared=True)
    with tfds.testing.mock_data(num_examples=9):
        ds = load_dataset("fashion_mnist")
    assert ds.source == "tfds:fashion_mnist" and "local copy" not in capsys.readouterr().err
    assert ds.x_train.shape == ds.x_test.shape == (9, 28, 28, 1) and ds.x_train.dtype == np.uint8
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32 and set(ds.y_train) <= set(range(10))
    assert ds.class_names == FASHION_MNIST_CLASSES and ds.x_train.max() > 0


def test_tfds_cifar10_and_cifar2_on_mock_data(monkeypatch):
    _tfds_state(monkeypatch, prepared=True)
    with tfds.testing.mock_data(num_examples=60):
        c10 = load_dataset("cifar10")
        c2 = load_dataset("cifar2")
    assert c10.x_train.shape == c10.x_test.shape == (60, 32, 32, 3)
    assert c10.x_train.dtype == np.uint8
    assert c10.class_names == CIFAR10_CLASSES and c2.class_names == ["airplane", "bird"]
    for x10, y10, x2, y2 in ((c10.x_train, c10.y_train, c2.x_train, c2.y_train),
                             (c10.x_test, c10.y_test, c2.x_test, c2.y_test)):
        keep = (y10 == 0) | (y10 == 2)  # airplane and bird, relabelled 0 and 1
        np.testing.assert_array_equal(x2, x10[keep])
        np.testing.assert_array_equal(y2, np.where(y10[keep] == 2, 1, 0))
        assert y2.dtype == np.int32 and set(y2) == {0, 1}


def test_tfds_second_load_comes_from_the_cache(monkeypatch):
    _tfds_state(monkeypatch, prepared=True)
    with tfds.testing.mock_data(num_examples=5):
        first = load_dataset("cifar10")
    monkeypatch.setattr(data, "_load_tfds", lambda *a, **k: pytest.fail("cache not used"))
    second = load_dataset("cifar10")  # outside mock_data: only the cache can answer
    for a in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(first, a), getattr(second, a))
    assert (second.class_names, second.source) == (CIFAR10_CLASSES, "tfds:cifar10")


def test_data_dir_comes_before_tfds(tmp_path, monkeypatch):
    _write_idx_dir(tmp_path / "fm")
    monkeypatch.setattr(data, "_tfds_prepared", lambda name: pytest.fail("tfds asked first"))
    assert load_dataset("fashion_mnist", tmp_path / "fm").source == str(tmp_path / "fm")


def test_unprepared_tfds_falls_back_to_the_local_copy_without_a_download(tmp_path, monkeypatch, capsys):
    _write_idx_dir(tmp_path / "fm", n_train=3, n_test=2)
    monkeypatch.setattr(data, "LOCAL_FASHION_MNIST", tmp_path / "fm")
    monkeypatch.setattr(data, "_tfds_prepared", lambda name: False)
    monkeypatch.setattr(data, "_tfds_unreachable", lambda name: pytest.fail("download probed"))
    ds = load_dataset("fashion_mnist")
    assert ds.source == str(tmp_path / "fm") and len(ds.x_train) == 3
    assert (f"tensorflow-datasets has no prepared fashion_mnist; using the local copy {tmp_path / 'fm'}"
            in capsys.readouterr().err)


def test_download_when_nothing_is_local_and_the_hosts_answer(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "LOCAL_FASHION_MNIST", tmp_path / "absent")
    probed = []
    monkeypatch.setattr(data, "_tfds_unreachable", lambda name: probed.append(name))  # None: reachable
    with tfds.testing.mock_data(num_examples=4):  # mocked: not prepared, and the download a no-op
        ds = load_dataset("fashion_mnist")
    assert probed == ["fashion_mnist"] and ds.source == "tfds:fashion_mnist"
    assert ds.x_train.shape == (4, 28, 28, 1)
    assert "downloading fashion_mnist with tensorflow-datasets" in capsys.readouterr().err


@pytest.mark.parametrize("name, tfds_name, hint", [
    ("fashion_mnist", "fashion_mnist", "apt-get install dataset-fashion-mnist"),
    ("cifar2", "cifar10", "cifar-10-batches-py"),
])
def test_no_source_left_is_one_clear_error(tmp_path, monkeypatch, name, tfds_name, hint):
    monkeypatch.setattr(data, "LOCAL_FASHION_MNIST", tmp_path / "absent")
    _tfds_state(monkeypatch, prepared=False, unreachable="example.org is unreachable (ConnectionError)")
    monkeypatch.setattr(data, "_load_tfds", lambda *a, **k: pytest.fail("download tried anyway"))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name)
    msg = str(err.value)
    assert msg.startswith(f"no data for {name!r}: tensorflow-datasets has no prepared {tfds_name} "
                          "and cannot download it: example.org is unreachable (ConnectionError)")
    assert hint in msg and f"tfds build {tfds_name}" in msg and "--data-dir" in msg


def test_a_failing_download_is_one_clear_error(tmp_path, monkeypatch):
    _tfds_state(monkeypatch, prepared=False, unreachable=None)

    def broken(*args, **kwargs):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(data, "_load_tfds", broken)
    with pytest.raises(FileNotFoundError, match=r"download of cifar10 failed \(ConnectionError: "
                       r"connection reset by peer\)\. To get it: pass --data-dir"):
        load_dataset("cifar10")


class _Head(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - the http.server naming
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_download_probe_is_bounded(monkeypatch):
    """Loopback only: a host that answers, a refused port, and one that accepts but never answers."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = http.server.HTTPServer(("127.0.0.1", 0), _Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody ever replies
    with socket.create_server(("127.0.0.1", 0)) as s:
        refused = s.getsockname()[1]  # closed again: connections are refused
    try:
        assert data._unreachable([f"http://127.0.0.1:{server.server_port}/a.gz"], timeout=2) is None
        assert "ConnectionError" in data._unreachable([f"http://127.0.0.1:{refused}/a.gz"], timeout=2)
        t0 = time.monotonic()
        why = data._unreachable([f"http://127.0.0.1:{silent.getsockname()[1]}/a.gz"], timeout=0.5)
        assert time.monotonic() - t0 < 2.5
        assert why == f"127.0.0.1:{silent.getsockname()[1]} is unreachable (ReadTimeout)"
    finally:
        server.shutdown()
        silent.close()


def test_tensorflow_is_imported_only_when_tfds_data_is_read(tmp_path):
    """`import flaxnets.data`, a --data-dir load and the local-copy fallback leave TensorFlow out."""
    _write_idx_dir(tmp_path / "fm")
    code = ("import sys; from pathlib import Path; from flaxnets import data; "
            "heavy = lambda: [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
            "print(heavy()); "
            f"data.load_dataset('fashion_mnist', {str(tmp_path / 'fm')!r}); print(heavy()); "
            f"data.LOCAL_FASHION_MNIST = Path({str(tmp_path / 'fm')!r}); "
            "print(data.load_dataset('fashion_mnist', use_cache=False).source, heavy()); "
            "(data._tfds_data_dir() / 'fashion_mnist').mkdir(parents=True); "
            "print(data.load_dataset('fashion_mnist', use_cache=False).source, heavy())")
    env = dict(os.environ, FLAXNETS_CACHE=str(tmp_path / "cache"), TFDS_DATA_DIR=str(tmp_path / "tfds"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # No <TFDS_DATA_DIR>/fashion_mnist: tfds is not even imported. With one (unprepared), the real
    # prepared-check imports tfds but not TensorFlow, and the local copy is still used.
    fm = tmp_path / "fm"
    assert out.stdout.split("\n")[:4] == ["[]", "[]", f"{fm} []", f"{fm} ['tensorflow_datasets']"]
