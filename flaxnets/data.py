"""Datasets as plain numpy arrays (uint8 NHWC images, int32 labels); no jax or torch import.

Sources: FashionMNIST/MNIST IDX files, CIFAR-10 python pickles, image folders, and
tensorflow-datasets (imported only when a named dataset needs it: TensorFlow is heavy). Loaded
arrays are cached as .npz under ``~/.cache/flaxnets`` (``$FLAXNETS_CACHE`` overrides) so a second
run starts in seconds.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import sys
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
CIFAR2_CLASSES = ["airplane", "bird"]  # CIFAR-10 labels 0 and 2, relabelled 0 and 1
LOCAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
DATASETS = ("fashion_mnist", "cifar10", "cifar2", "image_folder")


class DataError(ValueError):
    """Data that cannot be used (a corrupt file, a degenerate dataset): a one-line message naming it."""


def _why(e: BaseException) -> str:
    """An exception's reason on one line, without the file name an OSError repeats."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(text.split())


def _entries(d: Path) -> list[Path]:
    """The entries of directory ``d``; a DataError naming it if it cannot be listed."""
    try:
        return list(d.iterdir())
    except OSError as e:
        raise DataError(f"cannot list {d}: {_why(e)}") from None


@dataclass
class Dataset:
    """Train and test arrays of one dataset; an empty test set means 'split the training set'."""

    x_train: np.ndarray  # uint8 (N, H, W, C)
    y_train: np.ndarray  # int32 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    source: str  # where the arrays came from (a path or 'tfds:<name>'), for the run config

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``class_names``)."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------- IDX (MNIST format)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its stored shape."""
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut .gz an EOFError
        raise DataError(f"{path}: cannot read it as {'a gzipped' if gz else 'an'} IDX file "
                        f"({_why(e)})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path}: the IDX header of {ndim} dimensions is cut short "
                        f"({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) - offset != math.prod(dims) * dtype.itemsize:  # math.prod: no int64 overflow
        raise DataError(f"{path}: header says shape {dims} but the file holds "
                        f"{len(raw) - offset} data bytes")
    return np.frombuffer(raw, dtype, offset=offset).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped if ``path`` ends in .gz); used by the tests."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _find_idx(root: Path, split: str, kind: str) -> Path:
    # 'train-images-idx3-ubyte[.gz]' and the original MNIST mirror's 'train-images.idx3-ubyte'
    rank = 3 if kind == "images" else 1
    for stem in (f"{split}-{kind}-idx{rank}-ubyte", f"{split}-{kind}.idx{rank}-ubyte"):
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
    raise FileNotFoundError(f"{root} has no {split}-{kind}-idx{rank}-ubyte[.gz] "
                            "(expected the four MNIST/FashionMNIST IDX files)")


def load_idx_dir(path: str | os.PathLike, class_names: list[str] | None = None) -> Dataset:
    """Load the four MNIST-format IDX files (train/t10k images and labels, .gz or raw) in ``path``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    arrays = {}
    for split in ("train", "t10k"):
        x_path, y_path = _find_idx(root, split, "images"), _find_idx(root, split, "labels")
        x, y = read_idx(x_path), read_idx(y_path)
        if x.dtype != np.uint8:
            raise DataError(f"{x_path}: images are stored as {x.dtype}, expected unsigned bytes")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{y_path}: labels are stored as {y.dtype}, expected integers")
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{root}: {split} images {x.shape} and labels {y.shape} do not match")
        arrays[split] = (x[..., None], y.astype(np.int32))
    n = max((int(y.max()) + 1 for _, y in arrays.values() if len(y)), default=0)
    names = class_names or (FASHION_MNIST_CLASSES if n == 10 else [str(i) for i in range(n)])
    return Dataset(*arrays["train"], *arrays["t10k"], class_names=list(names), source=str(root))


# --------------------------------------------------------------------------- image folders
def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in _entries(root) if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.name)


def _decoded_image(path: Path):  # noqa: ANN202 - a PIL image; pillow is imported lazily
    """``path`` opened and fully decoded (the caller closes it), or a DataError naming it."""
    from PIL import Image, UnidentifiedImageError  # lazy: only image folders need pillow

    img = None
    try:
        img = Image.open(path)
        img.load()  # decode all of it now: a truncated file fails here, not half-read later
        return img
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error...
        if img is not None:
            img.close()
        why = ("not an image file, or in a format PIL cannot read"
               if isinstance(e, UnidentifiedImageError) else _why(e))
        raise DataError(f"{path}: cannot read the image ({why})") from None


def _read_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with _decoded_image(path) as img:
        if channels == 1:
            if img.mode not in ("L", "1", "P") or (img.mode == "P" and "transparency" in img.info):
                raise DataError(f"{path}: image has mode {img.mode!r}, expected a 1-channel "
                                "grayscale image")
            img = img.convert("L")
        else:
            if img.mode not in ("L", "1", "P", "RGB", "RGBA", "LA"):
                raise DataError(f"{path}: image mode {img.mode!r} cannot be read as RGB")
            img = img.convert("RGB")
        img = img.resize((size[1], size[0]), Image.BILINEAR)  # PIL takes (W, H)
        arr = np.asarray(img, np.uint8)
    return arr.reshape(size[0], size[1], channels)


def _read_tree(root: Path, names: list[str], size: tuple[int, int], channels: int
               ) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for label, name in enumerate(names):
        d = root / name
        files = sorted(p for p in _entries(d) if p.suffix.lower() in IMAGE_SUFFIXES) if d.is_dir() else []
        for p in files:
            xs.append(_read_image(p, size, channels))
            ys.append(label)
    if not xs:
        raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                        "in its class folders")
    return np.stack(xs), np.asarray(ys, np.int32)


def load_image_folder(root: str | os.PathLike, size: tuple[int, int], channels: int = 3) -> Dataset:
    """Load ``root/<class>/*.png|jpg`` (no test set) or ``root/train|test/<class>/*``, resized to ``size``.

    Class names are the sorted folder names (of ``train/`` in the second layout). Images are
    converted to ``channels`` (RGB or grayscale) and resized bilinearly with PIL.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    size = (int(size[0]), int(size[1]))
    if (root / "train").is_dir() and (root / "test").is_dir():
        names = [d.name for d in _class_dirs(root / "train")]
        if not names:
            raise DataError(f"{root / 'train'} has no class folders")
        extra = {d.name for d in _class_dirs(root / "test")} - set(names)
        if extra:
            raise DataError(f"{root / 'test'} has classes missing from train/: {sorted(extra)}")
        x_tr, y_tr = _read_tree(root / "train", names, size, channels)
        x_te, y_te = _read_tree(root / "test", names, size, channels)
    else:
        names = [d.name for d in _class_dirs(root)]
        if not names:
            raise DataError(f"{root} has no class folders (expected root/<class>/*.png or "
                            "root/train/<class> and root/test/<class>)")
        x_tr, y_tr = _read_tree(root, names, size, channels)
        x_te = np.zeros((0, *x_tr.shape[1:]), np.uint8)
        y_te = np.zeros((0,), np.int32)
    return Dataset(x_tr, y_tr, x_te, y_te, class_names=names, source=str(root))


# --------------------------------------------------------------------------- CIFAR-10 pickles
def load_cifar_pickles(path: str | os.PathLike) -> Dataset:
    """Load the CIFAR-10 'python version' directory (data_batch_1..5, test_batch)."""
    root = Path(path).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = root / name
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing (the CIFAR-10 python version holds "
                                    "data_batch_1..5 and test_batch)") from None
        except Exception as e:  # unpickling bad bytes raises EOFError, UnpicklingError, ValueError...
            raise DataError(f"{path}: not a CIFAR-10 batch (cannot unpickle it: {_why(e)})") from None
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise DataError(f"{path}: not a CIFAR-10 batch (no b'data' and b'labels' entries)")
        try:
            x, y = np.asarray(d[b"data"], np.uint8), np.asarray(d[b"labels"], np.int32)
        except (TypeError, ValueError, OverflowError) as e:
            raise DataError(f"{path}: b'data' or b'labels' is not numbers ({_why(e)})") from None
        if x.size % 3072 or y.ndim != 1 or x.size // 3072 != len(y):
            raise DataError(f"{path}: {x.size} data bytes and {y.size} labels do not make "
                            "32x32x3 images with one label each")
        return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = read("test_batch")
    return Dataset(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
                   x_te, y_te, class_names=list(CIFAR10_CLASSES), source=str(root))


def cifar2_from_cifar10(ds: Dataset) -> Dataset:
    """Keep airplane (0) and bird (2) and relabel them 0 and 1 (the material's cifar2)."""
    def keep(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = (y == 0) | (y == 2)
        return x[m], np.where(y[m] == 2, 1, 0).astype(np.int32)

    return Dataset(*keep(ds.x_train, ds.y_train), *keep(ds.x_test, ds.y_test),
                   class_names=list(CIFAR2_CLASSES), source=ds.source)


# --------------------------------------------------------------------------- tensorflow-datasets
TFDS_NAMES = {"fashion_mnist": "fashion_mnist", "cifar10": "cifar10", "cifar2": "cifar10"}
TFDS_PROBE_SECONDS = 5.0  # a download starts only if its hosts answer within this time


def _tfds_available() -> bool:
    import importlib.util

    # importlib_resources: tfds 4.9.10 imports it without declaring it (tensorflow/datasets#11212)
    return all(importlib.util.find_spec(m) is not None
               for m in ("tensorflow_datasets", "tensorflow", "importlib_resources"))


def load_triton_before_tensorflow() -> None:
    """Import triton (torch's GPU compiler, installed with torch) if present, before TensorFlow.

    Both bundle LLVM; when TensorFlow loads first in a process that has torch and jax, a later
    ``import torchvision`` (-> torch._dynamo -> triton) segfaults (reproduced with
    tensorflow-cpu 2.21, torch 2.14.1, jax 0.10.2; triton first: no crash).
    """
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


def _tfds():  # noqa: ANN202 - the module; imported late because TensorFlow costs seconds and memory
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    load_triton_before_tensorflow()
    import tensorflow_datasets as tfds

    return tfds


def _tfds_data_dir() -> Path:
    """tfds's default data directory (``tensorflow_datasets.core.constants.get_default_data_dir``)."""
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets")).expanduser()


def _tfds_prepared(tfds_name: str) -> bool:
    """Whether tfds holds ``tfds_name`` prepared on disk: a file check (no download, no TF)."""
    if not (_tfds_data_dir() / tfds_name).is_dir():
        return False  # nothing to ask tfds about; importing it costs 1.0-1.6 s of every run
    builder = _tfds().builder(tfds_name)
    # is_prepared() logs a warning for a missing folder too; a fresh machine has none
    return builder.data_path.is_dir() and bool(builder.is_prepared())


def _tfds_unreachable(tfds_name: str) -> str | None:
    """Why a tfds download of ``tfds_name`` cannot start (a host does not answer), or None."""
    return _unreachable(_tfds().builder(tfds_name).url_infos)


def _unreachable(urls: Iterable[str], timeout: float = TFDS_PROBE_SECONDS) -> str | None:
    """The first of ``urls``' hosts that does not answer an HTTP HEAD within ``timeout`` s, or None.

    tfds retries a failed connection 10 times with backoff (about 200 s here, where DNS fails at
    once) and sets no timeout, so this bounded probe decides first. It runs in a daemon thread so
    that a stuck DNS lookup, which no socket timeout covers, cannot hold the caller either.
    """
    import threading
    from urllib.parse import urlsplit

    import requests

    by_host = {urlsplit(u).netloc: u for u in urls}
    outcome: dict[str, str] = {}

    def probe() -> None:
        for host, url in by_host.items():
            try:
                requests.head(url, timeout=timeout, allow_redirects=False)
            except requests.RequestException as e:
                outcome["why"] = f"{host} is unreachable ({type(e).__name__})"
                return
        outcome["why"] = ""

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(2 * timeout * len(by_host) + 1)  # connect + read timeout per host
    why = outcome.get("why", f"no answer from {', '.join(by_host)} within {timeout:g} s")
    return why or None


def _load_tfds(tfds_name: str, class_names: list[str], download: bool) -> Dataset:
    tfds = _tfds()
    # Finite batches, not batch_size=-1: with unknown split sizes (tfds.testing.mock_data) tfds
    # batches by sys.maxsize, which aborts TensorFlow 2.21 (tensorflow/tensorflow#105098).
    splits = tfds.load(tfds_name, split=["train", "test"], batch_size=10_000, as_supervised=True,
                       download=download)
    arrays = []
    for split in splits:
        batches = list(tfds.as_numpy(split))
        arrays += [np.concatenate([b[0] for b in batches]).astype(np.uint8),
                   np.concatenate([b[1] for b in batches]).astype(np.int32)]
    return Dataset(*arrays, class_names=list(class_names), source=f"tfds:{tfds_name}")


# --------------------------------------------------------------------------- entry point + cache
def cache_dir() -> Path:
    """Where loaded datasets are cached ($FLAXNETS_CACHE or ~/.cache/flaxnets)."""
    return Path(os.environ.get("FLAXNETS_CACHE", Path.home() / ".cache" / "flaxnets"))


def _cache_key(name: str, data_dir: Path | None, size: object) -> str:
    stamp = ""
    if data_dir is not None:  # a changed directory (new files, mtime) gets a new cache entry
        entries = sorted((p.name, st.st_mtime_ns, st.st_size)
                         for p, st in ((p, _stat(p)) for p in _entries(data_dir)))
        stamp = f"{data_dir.resolve()}|{entries}"
    digest = hashlib.sha1(f"{name}|{stamp}|{size}".encode()).hexdigest()[:12]
    return f"{name}-{digest}.npz"


def _stat(p: Path) -> os.stat_result:
    try:
        return p.stat()
    except OSError:  # a broken symlink: key on the link; the loader says what is missing
        return p.lstat()


def _save_npz(path: Path, ds: Dataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
                     class_names=np.asarray(ds.class_names), source=np.asarray(ds.source))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_npz(path: Path) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        return Dataset(z["x_train"], z["y_train"], z["x_test"], z["y_test"],
                       class_names=[str(c) for c in z["class_names"]], source=str(z["source"]))


_HOW_TO_GET = {
    "fashion_mnist": "`apt-get install dataset-fashion-mnist` (files land in {local}), or pass "
                     "--data-dir DIR holding the four IDX files (train-images-idx3-ubyte.gz, ...)",
    "cifar10": "pass --data-dir DIR with the CIFAR-10 python version (cifar-10-batches-py from "
               "https://www.cs.toronto.edu/~kriz/cifar.html) or an image folder DIR/<class>/*.png",
    "image_folder": "pass --data-dir DIR laid out as DIR/<class>/*.jpg or DIR/train/<class> and "
                    "DIR/test/<class>",
}
_TFDS_CLASSES = {"fashion_mnist": FASHION_MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}


def _no_data(name: str, why: str) -> FileNotFoundError:
    how = _HOW_TO_GET["cifar10" if name == "cifar2" else name].format(local=LOCAL_FASHION_MNIST)
    if name in TFDS_NAMES:
        how += (f", or on a machine with internet run `tfds build {TFDS_NAMES[name]}` (pip install "
                "tensorflow-datasets tensorflow-cpu) and copy ~/tensorflow_datasets here")
    return FileNotFoundError(f"no data for {name!r}: {why}. To get it: {how}")


def _local_copy(name: str) -> Path | None:
    return LOCAL_FASHION_MNIST if name == "fashion_mnist" else None


def _pick_source(name: str, ddir: Path | None) -> tuple[str, Path | None, str | None]:
    """('dir'|'tfds'|'local'|'download', directory or None, note or None): where ``name`` is read from.

    Order: --data-dir; data tfds has prepared; the known local copy (with a note saying why); a
    tfds download if its hosts answer. Otherwise one FileNotFoundError that says how to get the data.
    """
    if ddir is not None:
        return "dir", ddir, None
    if name not in TFDS_NAMES:
        raise _no_data(name, "no --data-dir given")
    tfds_name = TFDS_NAMES[name]
    have_tfds = _tfds_available()
    if have_tfds and _tfds_prepared(tfds_name):
        return "tfds", None, None
    why = (f"tensorflow-datasets has no prepared {tfds_name}" if have_tfds
           else "tensorflow-datasets is not installed")
    local = _local_copy(name)
    if local is not None and local.is_dir():
        return "local", local, f"{why}; using the local copy {local}"
    if have_tfds:
        unreachable = _tfds_unreachable(tfds_name)
        if unreachable is None:
            return "download", None, None
        why += f" and cannot download it: {unreachable}"
    raise _no_data(name, why)


@functools.cache
def _note_once(message: str) -> None:
    """Print ``message`` on stderr the first time this process asks for it."""
    print(message, file=sys.stderr)


def _split_problem(x: np.ndarray, y: np.ndarray, num_classes: int) -> str | None:
    """What makes one split's arrays unusable, or None."""
    if x.ndim != 4:
        return f"images have shape {x.shape}, expected 4-D (N, H, W, C)"
    if x.dtype != np.uint8:
        return f"images are {x.dtype}, expected uint8"
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        return f"labels are {y.dtype} of shape {y.shape}, expected 1-D integers"
    if len(x) != len(y):
        return f"{len(x)} images but {len(y)} labels"
    bad = np.unique(y[(y < 0) | (y >= num_classes)])
    if len(bad):
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        return f"labels outside [0, {num_classes}) ({num_classes} class names): {shown}"
    return None


def check_dataset(ds: Dataset) -> None:
    """Raise a DataError naming ``ds.source`` if a classifier cannot train on ``ds``.

    That is: an empty or one-class training split, labels outside the class names, arrays of the
    wrong rank, type or length. An empty test split is fine (it means 'split the training set').
    """
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        problem = _split_problem(x, y, ds.num_classes)
        if problem:
            raise DataError(f"{ds.source}: {split} split: {problem}")
    if not len(ds.x_train):
        raise DataError(f"{ds.source}: the training split holds no images")
    if len(ds.x_test) and ds.x_test.shape[1:] != ds.x_train.shape[1:]:
        raise DataError(f"{ds.source}: test images are {ds.x_test.shape[1:]} but training images "
                        f"{ds.x_train.shape[1:]}")
    found = np.unique(ds.y_train)
    if len(found) < 2:
        names = ", ".join(repr(ds.class_names[i]) for i in found)
        raise DataError(f"{ds.source}: the training split holds {len(found)} class ({names}); "
                        "a classifier needs at least 2")


def _load_source(name: str, kind: str, path: Path | None, size: tuple[int, int] | None,
                 channels: int) -> Dataset:
    if kind in ("tfds", "download"):
        tfds_name = TFDS_NAMES[name]
        if kind == "download":
            print(f"downloading {tfds_name} with tensorflow-datasets", file=sys.stderr)
        try:
            ds = _load_tfds(tfds_name, _TFDS_CLASSES[tfds_name], download=kind == "download")
        except Exception as e:  # whatever tfds raised mid-download: still one clear message
            if kind == "tfds":
                raise
            raise _no_data(name, f"the tensorflow-datasets download of {tfds_name} failed "
                           f"({type(e).__name__}: {e})") from e
        return cifar2_from_cifar10(ds) if name == "cifar2" else ds
    assert path is not None
    if name == "fashion_mnist":
        return load_idx_dir(path)
    if name == "image_folder":
        return load_image_folder(path, size or (224, 224), channels)
    if any(path.glob("**/data_batch_1")):
        ds = load_cifar_pickles(next(path.glob("**/data_batch_1")).parent)
    else:
        ds = load_image_folder(path, size or (32, 32), channels)
        if ds.class_names != CIFAR10_CLASSES:
            return ds  # an image folder of other classes is taken as it is
    return cifar2_from_cifar10(ds) if name == "cifar2" else ds


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 size: tuple[int, int] | None = None, channels: int = 3,
                 use_cache: bool = True) -> Dataset:
    """Load dataset ``name`` ('fashion_mnist', 'cifar10', 'cifar2', 'image_folder'), cached as .npz.

    ``size`` (H, W) and ``channels`` apply to image folders only. Sources, in order: ``data_dir``,
    data tensorflow-datasets has prepared, the Debian FashionMNIST copy, a tfds download. Unusable
    data (a corrupt file, what ``check_dataset`` refuses) is a one-line DataError naming it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    ddir = Path(data_dir).expanduser() if data_dir is not None else None
    if ddir is not None and not ddir.is_dir():
        raise FileNotFoundError(f"--data-dir {ddir} does not exist or is not a directory")
    kind, src_dir, note = _pick_source(name, ddir)
    # size/channels only shape image folders; FashionMNIST and CIFAR pickles ignore them. A
    # directory source keys the cache on its contents, so the cache follows changes to it.
    shape_key = (tuple(size) if size else None, channels) if name != "fashion_mnist" else None
    path = cache_dir() / _cache_key(name, src_dir, shape_key)
    ds = None
    if use_cache and path.is_file():
        try:
            ds = _load_npz(path)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a corrupt cache entry is rebuilt
    fresh = ds is None
    if ds is None:
        ds = _load_source(name, kind, src_dir, tuple(size) if size else None, channels)
    check_dataset(ds)  # a cache hit too: an entry may predate a check
    if use_cache and fresh:
        try:
            _save_npz(path, ds)
        except OSError as e:  # a read-only home must not stop training
            print(f"warning: could not cache {name} at {path}: {e}", file=sys.stderr)
    if note:
        _note_once(note)
    return ds
