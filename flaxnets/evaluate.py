"""Evaluate trained weights (a run directory, or a .pt/.pth/.th/.bin or .safetensors file) in either
framework, on the recipe's test split or on an image folder (``scripts/evaluate.py``).

Both backends read the same weights file (``parity.files.read_weights``, torch layout); the JAX
backend converts it into the Flax model (``parity.convert.torch_to_flax``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flaxnets.data import IMAGE_SUFFIXES, load_dataset, load_image_folder
from flaxnets.metrics import confusion_matrix
from flaxnets.registry import check_image_shape, check_int, get_spec
from flaxnets.fit import make_splits
from flaxnets.recipes import IMAGENET_MEAN, IMAGENET_STD, recipe_for

# Files of a run directory that hold its final weights, in the order they are looked for.
RUN_WEIGHTS = ("model.pt", "model.safetensors", "checkpoints/best.pt", "checkpoints/last.pt")


@dataclass
class EvalResult:
    """Accuracy, loss and predictions of one evaluation."""

    accuracy: float
    loss: float
    confusion: np.ndarray
    class_names: list[str]
    labels: np.ndarray
    preds: np.ndarray
    images: np.ndarray  # the evaluated uint8 NHWC images (for the sample grid)
    weights_file: Path
    data_source: str
    notes: list[str]


def resolve_weights(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """The weights file meant by ``path`` and, for a run directory, its config.json."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--weights {path} does not exist")
    if not path.is_dir():
        return path, None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise FileNotFoundError(f"{path} is a directory but not a run directory (no readable "
                                f"config.json)") from None
    for name in RUN_WEIGHTS:
        if (path / name).is_file():
            return path / name, config
    raise FileNotFoundError(f"run directory {path} holds no weights ({', '.join(RUN_WEIGHTS)})")


def _is_image_folder(d: Path) -> bool:
    subdirs = [p for p in d.iterdir() if p.is_dir()]
    return any(f.suffix.lower() in IMAGE_SUFFIXES for s in subdirs for f in s.rglob("*"))


def eval_data(net: str, data_dir: str | Path | None, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """(images, labels, class names, source): an image folder's test part (all of it if it has no
    train/test split), else the recipe's test split, as the training run made it."""
    spec = get_spec(net)
    if data_dir is not None and Path(data_dir).is_dir() and _is_image_folder(Path(data_dir)):
        ds = load_image_folder(data_dir, spec.input_shape[:2], spec.input_shape[2])
        if len(ds.x_test):
            return ds.x_test, ds.y_test, ds.class_names, f"{data_dir} (test)"
        return ds.x_train, ds.y_train, ds.class_names, f"{data_dir} (all images)"
    recipe = recipe_for(net)
    ds = load_dataset(recipe.dataset, data_dir, size=spec.input_shape[:2], channels=spec.input_shape[2])
    splits = make_splits(ds, recipe, seed)
    return splits.x_test, splits.y_test, ds.class_names, f"{ds.source} (test split)"


def normalize(x_uint8: np.ndarray, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
              ) -> np.ndarray:
    """uint8 NHWC -> float32 in [0, 1], then (x - mean) / std per channel when given."""
    x = x_uint8.astype(np.float32) / 255.0
    if mean is not None:
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x


def _logits_jax(fmodel: Any, x: np.ndarray, batch: int) -> np.ndarray:
    import jax
    from flax import nnx

    fmodel.eval()
    graphdef, state = nnx.split(fmodel)
    forward = jax.jit(lambda st, xb: nnx.merge(graphdef, st)(xb))
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        pad = batch - len(xb)  # one shape, one compile: pad the last batch
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)]) if pad else xb
        out.append(np.asarray(forward(state, xb))[:batch - pad])
    return np.concatenate(out)


def _logits_torch(net: str, weights: Any, x: np.ndarray, batch: int) -> np.ndarray:
    import torch

    import torch_ref
    from parity.convert import check_state_dict

    model = torch_ref.create(net, num_classes=weights.num_classes)
    own = model.state_dict()
    check_state_dict({k: tuple(v.shape) for k, v in own.items()}, weights.state_dict,
                     what=f"torch {net}")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.state_dict.items()},
                          strict=True)
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch]).permute(0, 3, 1, 2)).numpy())
    return np.concatenate(out)


def evaluate(net: str, weights_path: str | Path, data_dir: str | Path | None = None,
             backend: str = "jax", mean: tuple[float, ...] | None = None,
             std: tuple[float, ...] | None = None, batch_size: int = 256, seed: int | None = None
             ) -> EvalResult:
    """Evaluate the weights in ``weights_path`` on ``net``'s test data with ``backend``.

    ``mean``/``std`` default to the recipe's normalisation; ``seed`` (default: the run's, else 0)
    recreates a carved-out test split exactly as training made it. Bad options are one ValueError
    (TypeError for a non-int count), raised before any weights or data are read.
    """
    channels = get_spec(net).input_shape[2]
    if backend not in ("jax", "torch"):
        raise ValueError(f"unknown backend {backend!r}; expected 'jax' or 'torch'")
    check_int("--batch-size", batch_size, 1)
    if seed is not None:
        check_int("--seed", seed, 0)
    for what, v in (("mean", mean), ("std", std)):
        if v is None:
            continue
        if len(v) != channels:
            raise ValueError(f"--{what} needs {channels} values for {net!r}, got {len(v)}")
        if not all(math.isfinite(c) for c in v):
            raise ValueError(f"--{what} values must be finite numbers, got {' '.join(map(str, v))}")
    if (mean is None) != (std is None):
        raise ValueError("give both --mean and --std, or neither")
    if std is not None and min(std) <= 0:
        raise ValueError(f"--std values must be positive, got {' '.join(map(str, std))}")

    from parity.convert import torch_to_flax
    from parity.files import read_weights

    wfile, config = resolve_weights(weights_path)
    if config is not None:
        if config.get("net") != net:
            raise ValueError(f"{weights_path} is a run of {config.get('net')!r}, not {net!r}")
        seed = config.get("seed", 0) if seed is None else seed
    x_u8, y, class_names, source = eval_data(net, data_dir, seed or 0)
    check_image_shape(net, x_u8.shape[1:])
    if mean is None and recipe_for(net).normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    x = normalize(x_u8, mean, std)
    weights = read_weights(wfile, net)
    if backend == "jax":
        logits = _logits_jax(torch_to_flax(net, weights.state_dict, weights.num_classes), x, batch_size)
    else:
        logits = _logits_torch(net, weights, x, batch_size)
    if logits.shape[1] != len(class_names):
        raise ValueError(f"the weights have {logits.shape[1]} classes but the data has "
                         f"{len(class_names)} ({', '.join(class_names[:10])})")
    logits = logits.astype(np.float64)
    logz = logits.max(1) + np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
    loss = float(np.mean(logz - logits[np.arange(len(y)), y]))
    preds = logits.argmax(1)
    return EvalResult(float(np.mean(preds == y)), loss,
                      confusion_matrix(y, preds, len(class_names)), list(class_names),
                      np.asarray(y), preds, x_u8, wfile, source, list(weights.notes))
