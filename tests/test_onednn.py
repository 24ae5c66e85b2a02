"""The oneDNN convolutions (flaxnets.xla_cpu.onednn) against lax's own, gradients included, and
the XLA fallback when the library is absent."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxnets import xla_cpu
from flaxnets.xla_cpu import onednn, switch
from flaxnets.xla_cpu.conv import _NHWC
from flaxnets.xla_cpu.stages import UNROLLED_MAX_BLOCKS

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="the oneDNN extension is not built")

# (batch, height, width, in, out, kernel, strides, padding, dilation)
CASES = [
    (2, 8, 8, 4, 6, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    (2, 9, 7, 5, 3, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # odd sizes, stride 2
    (1, 11, 11, 3, 8, (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1)),  # batch 1
    (3, 13, 12, 2, 4, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),
    (2, 6, 6, 7, 5, (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    (2, 7, 7, 6, 4, (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    (2, 12, 12, 4, 4, (3, 3), (1, 1), ((0, 0), (0, 0)), (2, 2)),  # dilation
    (2, 10, 11, 3, 5, (3, 3), (1, 2), ((2, 2), (2, 2)), (2, 1)),
    (2, 8, 8, 4, 4, (3, 3), (2, 2), ((0, 1), (1, 0)), (1, 1)),  # asymmetric ("SAME" of stride 2)
    (1, 9, 9, 16, 16, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # VALID drops a row and column
]


def _lax(x, k, strides, padding, dilation):
    return jax.lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=_NHWC,
                                        precision=jax.lax.Precision.HIGHEST)


@needs_onednn
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[5][0]}x{c[5][1]}s{c[6][0]}{c[6][1]}d{c[8][0]}{c[8][1]}")
def test_forward_and_gradients_match_lax(case):
    n, h, w, ci, co, kernel, strides, padding, dilation = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, ci)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((*kernel, ci, co)), jnp.float32)
    want, want_vjp = jax.vjp(lambda a, b: _lax(a, b, strides, padding, dilation), x, k)
    got, got_vjp = jax.vjp(jax.jit(lambda a, b: onednn.conv(a, b, strides, padding, dilation)), x, k)
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    for a, b in zip((got, *got_vjp(g)), (want, *want_vjp(g))):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


@pytest.fixture
def onednn_on():
    """The layers route convs to oneDNN, whatever FLAXNETS_ONEDNN_CONVS says."""
    with switch.using("onednn_convs"):
        yield


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


_ROUTED = """
import jax, jax.numpy as jnp
from flaxnets import xla_cpu
from flaxnets.xla_cpu.conv import _NHWC
f = lambda a, b: xla_cpu.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
print(jax.jit(f).lower(jnp.ones((2, 6, 6, 16)), jnp.ones((3, 3, 16, 4))).as_text().count("flaxnets_onednn_conv"))
"""


@needs_onednn
@pytest.mark.parametrize("setting, calls", [("", 1), ("off", 0), ("on", 1)])  # "": as if unset
def test_the_onednn_convs_are_on_unless_their_variable_says_off(setting, calls):
    done = _python(_ROUTED, FLAXNETS_ONEDNN_CONVS=setting)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == calls


@needs_onednn
def test_several_devices_keep_xlas_convs():
    """The custom calls carry no sharding rule: with more than one device the layers keep XLA's."""
    done = _python(_ROUTED, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == 0


@needs_onednn
def test_onednn_runs_on_an_openmp_runtime_of_its_own(tmp_path):
    """Where torch is imported its libgomp is global; oneDNN's OpenMP calls still bind to the copy
    beside the extension, so that torch's teams keep their own count of threads (onednn_build.py)."""
    code = ("import torch, jax, jax.numpy as jnp\nfrom flaxnets.xla_cpu import onednn\nassert onednn.available()\n"
            "f = jax.jit(lambda a, b: onednn.conv(a, b, (1, 1), ((1, 1), (1, 1)), (1, 1)))\n"
            "print(float(f(jnp.ones((2, 6, 6, 16)), jnp.ones((3, 3, 16, 4))).sum()))")
    done = _python(code, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(tmp_path / "ld"))
    assert done.returncode == 0, done.stderr[-2000:]
    # ones through a padded 3x3 conv: each output sums the taps inside the 6x6 image (2, 3, 3, 3, 3, 2
    # a row) times 16 channels; 2 images x 4 outputs
    assert float(done.stdout.split()[-1]) == 2 * 4 * 16 * (2 + 3 * 4 + 2) ** 2
    dnnl = str(onednn.LIBRARY.parent / onednn.LOCAL_DNNL)
    targets = {line.split(" to ")[1].split(" [")[0]
               for f in tmp_path.glob("ld.*") for line in f.read_text(errors="replace").splitlines()
               if f"file {dnnl} [" in line and "GOMP_" in line}
    assert targets == {str(onednn.LIBRARY.parent / onednn.LOCAL_GOMP)}


def _custom_calls(x, k, **kw) -> int:
    f = jax.jit(jax.grad(lambda a, b: jnp.sum(xla_cpu.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)),
                                                                            dimension_numbers=_NHWC, **kw) ** 2),
                         (0, 1)))
    return f.lower(x, k).as_text().count("flaxnets_onednn_conv")


@needs_onednn
def test_layers_route_float32_convs_only(onednn_on):
    """float32 convs of 9-64 input channels take the oneDNN calls (forward and both gradients);
    float64 keeps XLA's, which the float64 parity checks rely on, and so do
    ``without("onednn_convs")``, the convs of a few channels (LeNet's, the first convs) and those
    of more than 64 (DenseNet's)."""
    x, k = jnp.ones((2, 6, 6, 16)), jnp.ones((3, 3, 16, 4))
    assert _custom_calls(x, k) == 3
    assert _custom_calls(jnp.ones((2, 6, 6, 8)), jnp.ones((3, 3, 8, 4))) == 0
    assert _custom_calls(jnp.ones((2, 6, 6, 64)), jnp.ones((3, 3, 64, 4))) == 3
    assert _custom_calls(jnp.ones((2, 6, 6, 65)), jnp.ones((3, 3, 65, 4))) == 0  # DenseNet's 128 keep XLA's
    with xla_cpu.without("onednn_convs"):
        assert _custom_calls(x, k) == 0
    with jax.enable_x64(True):
        assert _custom_calls(x.astype(jnp.float64), k.astype(jnp.float64)) == 0


def test_without_the_library_xla_runs_and_says_so_once(onednn_on, monkeypatch):
    monkeypatch.setattr(onednn, "_state", {"error": "_onednn_conv.so did not load (test)"})
    x, k = jnp.ones((2, 6, 6, 16)), jnp.ones((3, 3, 16, 4))
    with pytest.warns(RuntimeWarning, match="keep XLA's own kernels"):
        assert _custom_calls(x, k) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _custom_calls(x, k) == 0
        got = xla_cpu.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    np.testing.assert_allclose(got, _lax(x, k, (1, 1), ((1, 1), (1, 1)), (1, 1)), rtol=1e-6)
    assert onednn.version() is None


def _scans(blocks: int) -> bool:
    """Whether a BlockStack of ``blocks`` identical 16-channel blocks after a first one scans them."""
    from flaxnets.layers import BlockStack
    from flaxnets.models.resnet_cifar import BasicBlock

    rngs = nnx.Rngs(0)
    stack = BlockStack(*(BasicBlock(16, 16, rngs=rngs) for _ in range(blocks + 1)), scan_from=1, scan_min=3)
    graphdef, state = nnx.split(stack)
    return "scan[" in str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.ones((1, 8, 8, 16))))


@needs_onednn
def test_stages_run_unrolled_where_onednn_runs_their_convs(onednn_on):
    """Up to UNROLLED_MAX_BLOCKS identical blocks run unrolled where oneDNN runs the convs; more of
    them, XLA's convs or ``without("unrolled_stages")`` keep the scan."""
    assert not _scans(UNROLLED_MAX_BLOCKS)
    assert _scans(UNROLLED_MAX_BLOCKS + 1)
    for off in ("unrolled_stages", "onednn_convs"):
        with xla_cpu.without(off):
            assert _scans(3)
    assert not _scans(2)  # below the stack's own scan_min
