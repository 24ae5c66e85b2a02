"""Every registered net trains one short epoch through ``fit`` on mock data of its input shape.

FashionMNIST and CIFAR nets read ``tfds.testing.mock_data`` through ``load_dataset``; DenseNets
read a generated image folder at 32x32 (they accept any size >= 32). Batches are tiny: compiling
the train and eval steps is what costs here, so a few real steps are enough.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

import flaxnets
from flaxnets import data
from flaxnets.data import Dataset, load_dataset
from flaxnets.train import fit, recipe_for

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4
MOCK_EXAMPLES = 40  # mock_data repeats them as the test split; cifar2 keeps the ~1/5 that are 0 or 2
DENSENET_SIZE = (32, 32)
# The deepest nets compile for minutes (measured on the shared 2-core CPU, default XLA flags:
# densenet121 160-210 s, densenet201 320 s; resnet1202 108 s with its stages scanned). They
# train in a child process with XLA's backend optimisation off: compile -53 % for densenet121
# (and -45 % for resnet110 when its blocks were unrolled), same first-epoch loss to 4 digits.
FAST_COMPILE = {"resnet1202", "densenet121", "densenet121_se", "densenet169",
                "densenet201"}
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


@pytest.fixture(scope="module")
def mock_datasets(tmp_path_factory):
    """dataset name -> Dataset, built once per module from mock tfds data or a generated folder."""
    made: dict[str, Dataset] = {}
    root = tmp_path_factory.mktemp("mock_data")

    def get(name: str) -> Dataset:
        if name not in made:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("FLAXNETS_CACHE", str(root / "cache"))
                if name == "image_folder":
                    made[name] = load_dataset(name, _image_folder(root / "images"),
                                              size=DENSENET_SIZE)
                else:  # mock_data stands in for data tfds has prepared
                    mp.setattr(data, "_tfds_prepared", lambda tfds_name: True)
                    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
                        made[name] = load_dataset(name)
        return made[name]

    return get


def _image_folder(root: Path, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (*DENSENET_SIZE, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / cls / f"{i}.png")
    return root


def train_one_epoch(name: str, ds: Dataset) -> dict[str, Any]:
    """Train ``name`` one epoch on ``ds`` with tiny batches; what the test checks, as JSON data."""
    initial = nnx.state(flaxnets.create(name, num_classes=ds.num_classes, seed=0), nnx.Param)
    r = fit(name, ds, recipe_for(name, epochs=1, batch_size=BATCH), seed=0)
    before = jax.tree.leaves(initial)
    after = jax.tree.leaves(nnx.state(r.model, nnx.Param))
    assert len(before) == len(after)
    return {"metrics": r.metrics, "eval_split": r.eval_split, "test_loss": r.test_loss,
            "test_acc": r.test_acc, "confusion": r.confusion.tolist(),
            "steps": r.info["steps_per_epoch"], "train_examples": r.info["train_examples"],
            "test_examples": r.info["test_examples"], "arrays": len(after),
            "unchanged": sum(bool(np.array_equal(a, b)) for a, b in zip(before, after)),
            "finite": all(bool(np.isfinite(a).all()) for a in after)}


def _train_in_child(name: str, ds: Dataset, tmp_path: Path) -> dict[str, Any]:
    np.savez(tmp_path / "ds.npz", x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test,
             y_test=ds.y_test, class_names=np.asarray(ds.class_names))
    code = ("import json, sys, numpy as np; from flaxnets.data import Dataset; "
            "from tests.test_all_nets_train import train_one_epoch; "
            "z = np.load(sys.argv[2]); "
            "ds = Dataset(*(z[k] for k in ('x_train', 'y_train', 'x_test', 'y_test')), "
            "[str(c) for c in z['class_names']], 'mock'); "
            "print(json.dumps(train_one_epoch(sys.argv[1], ds)))")
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}")
    out = subprocess.run([sys.executable, "-c", code, name, str(tmp_path / "ds.npz")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# Every net, resnet1202 included: its stages are scanned (flaxnets.layers.BlockStack), so its
# train step compiles in about 2 minutes here instead of not finishing in 16.5. It gets the same
# 10 steps as the others: after only 2, its eval-mode loss is NaN (BatchNorm running statistics
# of 2 batches through 600 blocks overflow; torch's twin does the same: eval logits std 3e16
# after one update), which is the net at lr 0.1, not the port.
@pytest.mark.parametrize("name", flaxnets.list_nets())
def test_one_short_epoch_on_mock_data(name, mock_datasets, tmp_path):
    dataset = recipe_for(name).dataset
    ds = mock_datasets(dataset)
    assert ds.source.endswith(f"tfds:{data.TFDS_NAMES[dataset]}" if dataset in data.TFDS_NAMES
                              else "images")
    s = (_train_in_child(name, ds, tmp_path) if name in FAST_COMPILE
         else train_one_epoch(name, ds))

    (row,) = s["metrics"]
    assert row["epoch"] == 1 and s["steps"] == s["train_examples"] // BATCH >= 2
    losses = [row["train_loss"], row[f"{s['eval_split']}_loss"], s["test_loss"]]
    assert np.all(np.isfinite(losses)) and min(losses) > 0
    assert 0 <= row["train_acc"] <= 1 and 0 <= s["test_acc"] <= 1
    cm = np.asarray(s["confusion"])
    assert cm.shape == (ds.num_classes,) * 2 and cm.sum() == s["test_examples"] > 0
    assert np.trace(cm) / cm.sum() == pytest.approx(s["test_acc"])
    assert s["finite"] and s["unchanged"] == 0, f"{s['unchanged']} of {s['arrays']} arrays unmoved"
