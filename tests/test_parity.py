"""Every net passes every parity check; the report names the first layer that diverges."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flaxnets
import torch_ref
from parity.check import (check_net, check_torchvision_densenet121, compare_eval_logits, first_divergence,
                          layer_deltas, randomize_torch)
from parity.convert import torch_to_flax
from tests.child import DEEP, by_tier, call_in_child


def parity_summary(name: str) -> dict[str, Any]:
    """What the test checks of ``check_net(name)``, as JSON data (the deep nets run it in a child)."""
    res = check_net(name)
    return {"ok": res.ok, "failures": res.failures, "flax_params": res.flax_params,
            "torch_params": res.torch_params, "roundtrip_exact": res.roundtrip_exact,
            "logits_delta": res.logits_delta, "grads_delta": res.grads_delta}


@pytest.mark.parametrize("name", by_tier(flaxnets.list_nets()))
def test_net_passes_parity(name):
    # A jitted check (the DenseNets) is a few big programs, compiled faster with the child's flag;
    # an eager one (ResNets) is hundreds of small programs that XLA's full optimisation runs far
    # faster (resnet1202's check 166 s with the flag, 88 s without; 2-core CPU).
    res = (call_in_child(f"{__name__}.parity_summary", name, fast_compile=flaxnets.get_spec(name).many_small_ops)
           if name in DEEP else parity_summary(name))
    assert res["ok"], res["failures"]
    assert res["flax_params"] == res["torch_params"] == flaxnets.get_spec(name).params
    assert res["roundtrip_exact"]
    assert res["logits_delta"] <= 1e-5 and res["grads_delta"] <= 1e-4


@pytest.mark.slow
def test_torchvision_densenet121_converts_and_matches():
    res = check_torchvision_densenet121()
    assert res.ok, res.failures


def test_resnet_option_b_passes_parity():
    res = check_net("resnet20", option="B")
    assert res.ok, res.failures
    # projection shortcuts in layer2.0 and layer3.0: 1x1 convs 16->32, 32->64 and their BNs
    assert res.flax_params == res.torch_params == 269_722 + 16 * 32 + 32 * 64 + 2 * (32 + 64)


def _pair(name):
    torch.manual_seed(0)
    t = torch_ref.create(name)
    h, w, c = flaxnets.get_spec(name).check_shape
    randomize_torch(t, 0, (h, w, c))
    f = torch_to_flax(name, t.state_dict())
    t.eval()
    f.eval()
    x = np.random.RandomState(0).randn(2, c, h, w).astype(np.float32)
    return t, f, x


def test_matching_models_have_no_divergent_layer():
    t, f, x = _pair("resnet20")
    rows = layer_deltas(t, f, x)
    assert {"conv1", "bn1", "layer1.0.conv1", "layer3.2.bn2", "linear"} <= {r.path for r in rows}
    assert first_divergence(t, f, x) is None
    jitted = layer_deltas(t, f, x, jit=True)  # one program: the same layers, in the same order
    assert [r.path for r in jitted] == [r.path for r in rows] and all(r.ok for r in jitted)


@pytest.mark.parametrize("name,layer", [("resnet20", "layer2.1.bn1"), ("lenet", "fc.2"),
                                        pytest.param("densenet121_se", "features.denseblock2.denselayer3.conv1",
                                                     marks=pytest.mark.slow)])
def test_the_first_divergent_layer_is_named(name, layer):
    t, f, x = _pair(name)
    module = f
    for part in layer.split("."):
        module = getattr(module, part)
    var = module.var if hasattr(module, "var") else module.kernel
    var.set_value(var[...] * 1.5)  # a conversion bug in exactly one layer
    hit = first_divergence(t, f, x, jit=flaxnets.get_spec(name).many_small_ops)
    assert hit is not None and hit.path == layer, hit
    assert hit.delta > 1e-5


def test_eval_logits_are_held_against_the_tolerance_relative_to_their_size():
    t, f, x = _pair("resnet20")
    logits = compare_eval_logits(t, f, x)
    assert logits.same_shape and logits.ok and logits.delta <= 1e-5
    assert logits.scale == max(1.0, float(np.abs(logits.torch_out).max()))
    assert logits.tolerance == 1e-5 * logits.scale and logits.max_abs <= logits.tolerance
    off = type(logits)(logits.torch_out, logits.flax_out + 2e-5 * logits.scale)
    assert not off.ok and off.max_abs > off.tolerance
    cut = type(logits)(logits.torch_out, logits.flax_out[:, :3])
    assert not cut.same_shape and not cut.ok


def test_check_reports_a_broken_conversion(monkeypatch):
    """A converter that forgets to transpose one layer must fail the check and name that layer."""
    import parity.check as check
    from parity.convert import torch_to_flax as real

    def broken(name, sd, **kw):
        model = real(name, sd, **kw)
        k = model.conv2.kernel
        k.set_value(jnp.swapaxes(k[...], 0, 1))  # H and W swapped, the classic bug
        return model

    monkeypatch.setattr(check, "torch_to_flax", broken)
    res = check.check_net("net")
    assert not res.ok
    assert res.divergence is not None and res.divergence.path == "conv2"
    assert any("eval logits" in f for f in res.failures)


def test_train_logits_prove_the_conversion_in_float64_and_float32_accuracy_apart(monkeypatch):
    """The conversion is proved on the float64 train-mode logits; a float32-only error (here 1e-4
    relative on every float32 forward) fails the float32 accuracy check and not that proof."""
    import parity.check as check

    res = check.check_net("net_batchnorm")
    assert res.ok, res.failures
    assert res.train_logits_delta < 1e-12  # float64: rounding is gone, the conversion is exact
    # the numbers are parity.compare's, which check_net runs (its table is the same measurement)
    assert res.compare is not None and res.compare.ok and res.grads_delta == res.compare.grads_delta
    assert set(res.compare.bn_stats) >= {"conv1_batchnorm.running_var", "conv1_batchnorm.num_batches_tracked"}
    assert 0 < res.train_f32_error <= max(check.LOGIT_RTOL, check.F32_ERROR_RATIO * res.torch_f32_error)

    import parity.comparison as comparison  # where check_net's comparison runs its Flax forwards

    real = comparison.flax_logits
    monkeypatch.setattr(comparison, "flax_logits", lambda *a: real(*a) * np.float32(1 + 1e-4))
    res = check.check_net("net_batchnorm")
    assert any(f.startswith("train logits in float32 are") for f in res.failures), res.failures
    assert not any("(f64)" in f for f in res.failures)


def test_parity_cli_prints_a_row_and_exit_status(capsys):
    from scripts.parity import main

    assert main(["--net", "net_batchnorm"]) == 0
    out = capsys.readouterr().out
    assert "| net_batchnorm | 38,482 |" in out and "PASS" in out
    assert main(["--net", "vgg16"]) == 2
    assert "unknown net 'vgg16'" in capsys.readouterr().err
