"""Mixed precision (``Recipe.precision`` 'bf16', ``train.py --precision``): bf16 compute in both
engines with fp32 master weights, optimiser state and BatchNorm statistics, and the same meaning
in both: a converted pair's bf16 logits agree as closely as bf16 rounding allows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity
import torch_ref
from flaxnets.engine import JaxEngine, create_model
from flaxnets.fit import Splits, check_resumable, run_meta
from flaxnets.layers import set_compute_dtype
from flaxnets.recipes import recipe_for
from flaxnets.registry import get_spec
from parity.check import randomize_torch
from parity.comparison import flax_input
from tests.test_train import synthetic
from torch_ref.engine import TorchEngine, autocast


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid: fp32, bf16"):
        recipe_for("lenet", precision="fp16")


def conv_and_dot_lines(fn, *args) -> list[str]:
    """The jaxpr lines of ``fn(*args)``'s convolutions and matrix products (nested ones too)."""
    text = str(jax.make_jaxpr(fn)(*args))
    return [ln for ln in text.splitlines() if "conv_general_dilated" in ln or "dot_general" in ln]


def test_a_bf16_jax_model_convolves_and_multiplies_in_bf16():
    x = jnp.zeros((2, 32, 32, 3), jnp.float32)
    for precision, dtype in (("fp32", "f32"), ("bf16", "bf16")):
        model = create_model("net_batchnorm", 2, 0, precision)
        lines = conv_and_dot_lines(lambda m, x: m(x), model, x)
        assert lines and all(f":{dtype}[" in ln.split("=")[0] for ln in lines), (precision, lines)
        # the parameters themselves stay fp32: cast at use
        assert {p.dtype for p in jax.tree.leaves(model)} <= {jnp.dtype("float32"), jnp.dtype("int32")}


def rgb_splits(n: int = 64) -> Splits:
    """``n`` synthetic 32x32 RGB training images with 10 classes (16 of them as the test set)."""
    ds = synthetic(n_train=n, n_test=16, classes=10)
    x = np.repeat(np.pad(ds.x_train, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)
    return Splits(x, ds.y_train, x[:16], ds.y_train[:16])


@pytest.mark.parametrize("net", ["net_batchnorm", "resnet20"])
def test_bf16_jax_training_keeps_fp32_state_and_tracks_fp32(net):
    splits = rgb_splits()
    losses = {}
    for precision in ("fp32", "bf16"):
        engine = JaxEngine(net, splits, 10, recipe_for(net, batch_size=16, precision=precision), 0)
        losses[precision] = engine.train_epoch(0)[:, 0] / 16
        state = jax.tree.leaves((engine.state, engine.opt_state))
        assert {a.dtype for a in state} <= {jnp.dtype("float32"), jnp.dtype("int32")}, precision
    assert np.all(np.isfinite(losses["bf16"]))
    # bf16 rounding moves the losses a little, not a lot (bf16 has 8 significant bits: 0.4 %)
    rel = np.abs(losses["bf16"] - losses["fp32"]) / losses["fp32"]
    assert 0 < rel.max() < 0.05, rel


def test_bf16_torch_training_autocasts_and_keeps_fp32_state():
    engine = TorchEngine("net_batchnorm", rgb_splits(), 10, recipe_for("net_batchnorm", batch_size=16,
                                                                precision="bf16"), 0)
    seen = []
    engine.model.conv2.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    sums = engine.train_epoch(0)
    assert np.all(np.isfinite(sums)) and seen and set(seen) == {torch.bfloat16}
    assert {v.dtype for v in engine.model.state_dict().values()} <= {torch.float32, torch.int64}
    assert all(t.dtype == torch.float32 for s in engine.opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.is_floating_point())


@pytest.mark.parametrize("net", ["lenet", "net_batchnorm", "resnet20"])
def test_bf16_means_the_same_in_both_engines(net):
    """One converted pair, eval logits: JAX bf16 against torch autocast bf16 differ by no more
    than bf16 rounding (measured against each side's own distance from fp32)."""
    h, w, c = get_spec(net).input_shape
    torch.manual_seed(0)
    tm = torch_ref.create(net, num_classes=10)
    randomize_torch(tm, 0, (h, w, c))
    tm.eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, c, h, w)).astype(np.float32))
    with torch.no_grad():
        t32 = tm(x).numpy()
        with autocast(x.device, "bf16"):
            t16 = tm(x).float().numpy()
    logits = {}
    for precision in ("fp32", "bf16"):
        fm = parity.torch_to_flax(net, tm.state_dict(), num_classes=10)
        if precision == "bf16":
            set_compute_dtype(fm, jnp.bfloat16)
        fm.eval()
        logits[precision] = np.asarray(fm(jnp.asarray(flax_input(x.numpy(), tm))), np.float32)
    rounding = max(np.abs(t16 - t32).max(), np.abs(logits["bf16"] - logits["fp32"]).max())
    assert np.abs(logits["fp32"] - t32).max() < 1e-4  # the pair is a proven pair in fp32
    assert rounding > 1e-3  # bf16 really ran on both sides
    assert np.abs(logits["bf16"] - t16).max() <= 2 * rounding, (np.abs(logits["bf16"] - t16).max(), rounding)


def test_a_checkpoint_from_before_precision_resumes_as_fp32():
    recipe = recipe_for("lenet")
    old = run_meta("lenet", "jax", 0, 10, recipe)
    del old["recipe"]["precision"]
    check_resumable(old, run_meta("lenet", "jax", 0, 10, recipe))  # no error: its default
    with pytest.raises(ValueError, match="precision"):
        check_resumable(old, run_meta("lenet", "jax", 0, 10, recipe_for("lenet", precision="bf16")))
