"""flaxnets.fit/engine/recipes and scripts/train.py: recipes, the JAX engine, run directories, the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import chex
import pytest
from flax import nnx

import flaxnets
from flaxnets.data import Dataset, load_dataset, write_idx
from flaxnets.engine import make_optimizer, preprocess, random_crop_flip
from flaxnets.fit import epoch_permutation, fit, split_arrays
from flaxnets.introspect import model_summary
from flaxnets.recipes import recipe_for
from flaxnets.runs import write_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train as train_script  # noqa: E402  (scripts/train.py)


def synthetic(n_train: int = 768, n_test: int = 200, classes: int = 4, seed: int = 0) -> Dataset:
    """28x28 gray images whose class is a bright 7x7 block in one quadrant, plus noise."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, classes, n).astype(np.int32)
        x = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
        for i, c in enumerate(y):
            r, q = 3 + 14 * (c // 2), 3 + 14 * (c % 2)
            x[i, r:r + 7, q:q + 7] = 220
        return x, y

    return Dataset(*make(n_train), *make(n_test), class_names=[f"c{i}" for i in range(classes)],
                   source="synthetic")


LENET_RECIPE = recipe_for("lenet", epochs=2, batch_size=32, lr=1e-2)


@pytest.fixture(scope="module")
def lenet_run():
    """Two short epochs of lenet on the synthetic set (shared by several tests).

    The sigmoid LeNet sits on a loss plateau for its first ~100 steps, hence 128 small steps.
    """
    return fit("lenet", synthetic(n_train=2048), LENET_RECIPE, seed=0)


def test_recipes_follow_the_issue_table():
    assert recipe_for("lenet").optimizer == "adam" and recipe_for("lenet").batch_size == 256
    assert recipe_for("net_width") == recipe_for("net_dropout") == recipe_for("net")
    assert recipe_for("net_batchnorm").l2 == 1e-3 and recipe_for("net").l2 == 0
    r = recipe_for("resnet56")
    assert (r.dataset, r.momentum, r.weight_decay, r.milestones) == ("cifar10", 0.9, 1e-4, (100, 150))
    assert recipe_for("densenet121_se").dataset == "image_folder"
    assert recipe_for("dilated").val_fraction == 0.2
    assert recipe_for("lenet", epochs=1, lr=None).epochs == 1  # None keeps the recipe value
    with pytest.raises(flaxnets.UnknownNetError):
        recipe_for("nope")


def test_per_net_cpu_compile_options_reach_the_compiled_steps(lenet_run):
    """lenet's steps compile without YNN library fusions (CPU_COMPILE_OPTIONS); the switch
    ``without('cpu_compile_options')`` and the nets without an entry keep XLA's defaults. Every
    entry is an option this XLA knows (it refuses unknown ones) and keeps the function."""
    from flaxnets import xla_cpu
    from flaxnets.fit import make_engine, make_splits
    from flaxnets.xla_cpu import CPU_COMPILE_OPTIONS, compile_options

    assert compile_options("lenet", "cpu") == CPU_COMPILE_OPTIONS["lenet"] and compile_options("dilated", "cpu") == {}
    x = jnp.linspace(-3, 3, 999, dtype=jnp.float32)
    f = jax.jit(lambda v: jnp.tanh(v) @ v)
    for name in CPU_COMPILE_OPTIONS:
        assert float(f.lower(x).compile(compile_options(name, "cpu"))(x)) == pytest.approx(float(f(x)), rel=1e-6)
    engine = lenet_run.engine
    assert "__ynn_fusion" not in engine.train_fn.as_text()
    assert all("__ynn_fusion" not in f.as_text() for f in engine.eval_fns.values())
    with xla_cpu.without("cpu_compile_options"):
        assert compile_options("lenet", "cpu") == {}
        default = make_engine("jax", "lenet", make_splits(synthetic(n_train=64, n_test=32), LENET_RECIPE, 0),
                              4, LENET_RECIPE, 0)
    assert "__ynn_fusion" in default.train_fn.as_text()  # what the option takes away


def test_lenet_learns(lenet_run):
    m = lenet_run.metrics
    assert [row["epoch"] for row in m] == [1, 2]
    assert m[1]["train_loss"] < m[0]["train_loss"]
    assert m[1]["test_loss"] < m[0]["test_loss"]
    assert lenet_run.test_acc > 0.4  # 4 classes: chance is 0.25
    assert lenet_run.test_acc == pytest.approx(m[-1]["test_acc"])
    cm = lenet_run.confusion
    assert cm.shape == (4, 4) and cm.sum() == 200  # every test example, incl. the padded tail
    assert np.trace(cm) / cm.sum() == pytest.approx(lenet_run.test_acc)
    # exactly correct / count, as the torch engine and the material report it (not a float32 ratio)
    assert [row["test_acc"] for row in m] == [round(row["test_acc"] * 200) / 200 for row in m]
    assert lenet_run.test_acc == np.trace(cm) / 200


def test_same_seed_same_metrics(lenet_run):
    again = fit("lenet", synthetic(n_train=2048), LENET_RECIPE, seed=0)
    def strip(ms):  # timings differ run to run; everything else must be bit-identical
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in ms]

    assert strip(again.metrics) == strip(lenet_run.metrics)
    np.testing.assert_array_equal(again.confusion, lenet_run.confusion)


def test_validation_split_keeps_best_weights():
    r = fit("dilated", synthetic(n_train=400, n_test=64),
            recipe_for("dilated", epochs=2, batch_size=32, lr=3e-3), seed=1)
    assert r.eval_split == "val" and "val_acc" in r.metrics[0]
    assert r.info["val_examples"] == 80 and r.info["train_examples"] == 320
    assert r.info["best_val_acc"] == max(row["val_acc"] for row in r.metrics)
    assert r.confusion.sum() == 64
    assert r.metrics[-1]["val_acc"] > 0.5  # the ReLU net learns the quadrants quickly


def test_run_dir(lenet_run, tmp_path):
    out = write_run(tmp_path / "run", {"net": "lenet"}, lenet_run)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["net"] == "lenet" and cfg["test_acc"] == lenet_run.test_acc
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2
    assert float(rows[1]["train_loss"]) == pytest.approx(lenet_run.metrics[1]["train_loss"])
    for png in ("curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_total_equals_registry():
    for name in ("lenet", "dilated", "net_batchnorm", "resnet20"):
        spec = flaxnets.get_spec(name)
        abstract = nnx.eval_shape(lambda: flaxnets.create(name))  # noqa: B023 - called at once
        rows, total = model_summary(abstract, spec.input_shape)
        assert total == spec.params == sum(r[3] for r in rows)
    rows, _ = model_summary(flaxnets.create("lenet"), (28, 28, 1))
    assert rows[-1][2] == "(1,10)"


def test_preprocess_and_augment():
    x = np.full((2, 32, 32, 3), 255, np.uint8)
    recipe = recipe_for("resnet20")
    out = np.asarray(preprocess(x, recipe))
    expected = (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
    img = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
    aug = np.asarray(random_crop_flip(img, jax.random.key(3), pad=2))
    assert aug.shape == img.shape
    # every output is a shifted/flipped window of the zero-padded input
    padded = np.pad(img, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for b in range(2):
        windows = [w for i in range(5) for j in range(5)
                   for w in (padded[b, i:i + 8, j:j + 8], padded[b, i:i + 8, j:j + 8][:, ::-1])]
        assert any(np.array_equal(aug[b], w) for w in windows)


def test_a_partial_last_batch_is_trained_as_a_batch_of_its_own():
    """LeNet on 6 examples in batches of 4: the second step is the 2-example batch's own step
    (the padding the compiled step carries changes nothing), as the material's DataLoader."""
    from flaxnets.engine import JaxEngine, train_step
    from flaxnets.fit import make_splits

    ds = synthetic(n_train=6, n_test=4)
    recipe = recipe_for("lenet", epochs=1, batch_size=4)
    splits = make_splits(ds, recipe, 0)
    engine = JaxEngine("lenet", splits, ds.num_classes, recipe, seed=0)
    assert (engine.steps, engine.examples) == (2, 6)
    state, opt_state = jax.tree.map(jnp.copy, (engine.state, engine.opt_state))
    sums = engine.train_epoch(0)

    k_aug = jax.random.split(jax.random.fold_in(engine.key, 0))[1]
    perm = epoch_permutation(0, 0, 6)
    assert sorted(perm) == list(range(6))
    np.testing.assert_array_equal(np.asarray(engine.permutation(0)), [*perm, 0, 0])  # padded
    model = flaxnets.create("lenet", num_classes=ds.num_classes, seed=0)
    gd = nnx.split(model, nnx.Param, ...)[0]
    tx = make_optimizer(recipe, 2)[0]
    step = jax.jit(lambda *a: train_step(gd, *a, tx=tx, recipe=recipe))  # op by op took ~30 s
    want = []
    for i, idx in enumerate((perm[:4], perm[4:])):
        x, y = jnp.asarray(splits.x_train[idx]), jnp.asarray(splits.y_train[idx], jnp.int32)
        state, opt_state, s = step(state, opt_state, x, y, jnp.ones(len(idx), bool),
                                   jax.random.fold_in(k_aug, i))
        want.append(s)
    np.testing.assert_allclose(sums, np.stack(want), rtol=1e-5)
    chex.assert_trees_all_close(engine.state, state, rtol=1e-5, atol=1e-7)
    assert fit("lenet", ds, recipe, seed=0).info["examples_per_epoch"] == 6


def test_the_torch_engine_trains_a_partial_last_batch_too():
    from flaxnets.fit import make_splits
    from torch_ref.engine import TorchEngine

    ds = synthetic(n_train=6, n_test=4)
    recipe = recipe_for("lenet", epochs=1, batch_size=4)
    engine = TorchEngine("lenet", make_splits(ds, recipe, 0), ds.num_classes, recipe, seed=0)
    assert (engine.steps, engine.examples) == (2, 6)
    weights = []
    sums = engine.train_epoch(0, lambda e, i, n: weights.append(engine.model.fc[0].weight.detach().clone()))
    assert len(weights) == 2 and not np.array_equal(weights[0].numpy(), weights[1].numpy())
    assert sums.shape == (2, 2) and sums[1, 1] <= 2 and np.all(sums[:, 0] > 0)


def test_nets_with_batchnorm_drop_a_partial_last_batch():
    from flaxnets.fit import epoch_batches

    assert epoch_batches("net_batchnorm", 10, 4) == (2, 8)
    assert epoch_batches("net", 10, 4) == (3, 10)
    with pytest.raises(ValueError, match="fewer than one batch"):
        epoch_batches("resnet20", 3, 4)
    assert epoch_batches("lenet", 3, 4) == (1, 3)  # (the flag's truth: tests/test_models.py)


def test_resnet_lr_schedule_steps_at_milestones():
    tx, lr_at = make_optimizer(recipe_for("resnet20"), steps_per_epoch=10)
    assert [lr_at(e * 10) for e in (0, 99, 100, 149, 150, 199)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    w = {"w": jnp.ones(3)}
    upd, _ = tx.update({"w": jnp.zeros(3)}, tx.init(w), w)  # zero grad: only weight decay acts
    np.testing.assert_allclose(upd["w"], -0.1 * 1e-4, rtol=1e-5)


def test_split_arrays_is_reproducible():
    x, y = np.arange(100)[:, None], np.arange(100)
    a = split_arrays(x, y, 0.2, seed=5)
    b = split_arrays(x, y, 0.2, seed=5)
    assert len(a[0]) == 80 and len(a[2]) == 20
    assert sorted(np.concatenate([a[1], a[3]])) == list(range(100))
    np.testing.assert_array_equal(a[3], b[3])


def test_image_shape_mismatch_is_a_clear_error():
    ds = synthetic(n_train=64, n_test=8)
    with pytest.raises(ValueError, match="takes 3-channel images, the data has 1 channels"):
        fit("net", ds, recipe_for("net", epochs=1))
    wide = Dataset(np.zeros((64, 32, 32, 1), np.uint8), ds.y_train, ds.x_test, ds.y_test,
                   ds.class_names, "synthetic")
    with pytest.raises(ValueError, match="takes 28x28 images, the data has 32x32"):
        fit("lenet", wide, recipe_for("lenet", epochs=1))


def test_script_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLAXNETS_CACHE", str(tmp_path / "cache"))
    ds = synthetic(n_train=256, n_test=50, classes=10)
    d = tmp_path / "idx"
    d.mkdir()
    for split, x, y in (("train", ds.x_train, ds.y_train), ("t10k", ds.x_test, ds.y_test)):
        write_idx(d / f"{split}-images-idx3-ubyte.gz", x[..., 0])
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    out = tmp_path / "run"
    rc = train_script.main(["--net", "lenet", "--epochs", "1", "--batch-size", "64",
                            "--data-dir", str(d), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "total trainable parameters       44,426" in text
    assert "epoch   1/1" in text and "final test accuracy" in text
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.csv", "curves.png",
                                               "confusion_matrix.png"}
    assert json.loads((out / "config.json").read_text())["recipe"]["epochs"] == 1


def test_real_fashion_mnist_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXNETS_CACHE", str(tmp_path))
    full = load_dataset("fashion_mnist")
    sub = Dataset(full.x_train[:6144], full.y_train[:6144], full.x_test[:1000], full.y_test[:1000],
                  full.class_names, full.source)
    r = fit("lenet", sub, recipe_for("lenet", epochs=1, batch_size=32, lr=3e-3))
    assert r.test_acc > 0.4  # one short epoch (measured 0.54); chance is 0.1


@pytest.mark.slow
def test_data_parallel_on_two_host_devices(tmp_path):
    """Two fake CPU devices: batches shard over the 'data' axis and match the 1-device result."""
    code = ("import sys, jax; sys.path.insert(0, 'tests'); from test_train import synthetic_rgb;"
            "from flaxnets.fit import fit; from flaxnets.recipes import recipe_for;"
            "r = fit('net_batchnorm', synthetic_rgb(), recipe_for('net_batchnorm', epochs=1, batch_size=32));"
            "print(len(jax.devices()), r.info['devices'], r.metrics[0]['train_loss'])")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n_dev, used, loss2 = out.stdout.split()
    assert n_dev == used == "2"
    one = fit("net_batchnorm", synthetic_rgb(), recipe_for("net_batchnorm", epochs=1, batch_size=32))
    assert float(loss2) == pytest.approx(one.metrics[0]["train_loss"], rel=1e-4)


def synthetic_rgb(n: int = 256) -> Dataset:
    """32x32 RGB two-class images (class 1 has a bright top band) for the cifar2 nets."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, n).astype(np.int32)
    x = rng.integers(0, 200, (n, 32, 32, 3)).astype(np.uint8)
    x[y == 1, :8] = 255
    return Dataset(x, y, x[:40], y[:40], ["airplane", "bird"], "synthetic")


def test_the_steps_compile_once_per_shape_over_several_epochs(monkeypatch):
    """Three epochs of a partial last batch and two eval splits of other lengths: the train step
    is traced once, the eval step once per split (chex counts the traces of the wrapped step)."""
    import flaxnets.engine as engine_mod

    chex.clear_trace_counter()
    monkeypatch.setattr(engine_mod, "train_step", chex.assert_max_traces(engine_mod.train_step, n=1))
    monkeypatch.setattr(engine_mod, "eval_step", chex.assert_max_traces(engine_mod.eval_step, n=2))
    ds = synthetic(n_train=100, n_test=40)
    recipe = recipe_for("lenet", epochs=3, batch_size=32, val_fraction=0.25)
    result = fit("lenet", ds, recipe, seed=0)
    assert result.info["train_examples"] == 75 and result.info["steps_per_epoch"] == 3  # 32+32+11
    assert [r["epoch"] for r in result.metrics] == [1, 2, 3]
    with pytest.raises(AssertionError, match="traced > 1 times"):  # the counter does count
        args, tx = _train_step_args(recipe)
        jax.jit(engine_mod.train_step, static_argnums=0, static_argnames=("tx", "recipe"))(
            *args, tx=tx, recipe=recipe)


def _train_step_args(recipe):
    """Arguments of one traced ``train_step`` call (one more trace than the engine's)."""
    from flaxnets.engine import make_optimizer

    model = flaxnets.create("lenet", num_classes=4, seed=0)
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(recipe, 1)[0]
    x = jnp.zeros((2, 28, 28, 1), jnp.uint8)
    return (gd, (params, rest), tx.init(params), x, jnp.zeros(2, jnp.int32), jnp.ones(2, bool),
            jax.random.key(0)), tx
