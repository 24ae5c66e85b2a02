"""The CPU-only conv and pooling forms of flaxnets.layers equal XLA's own; BlockStack (the
scanned ResNet stages) equals its blocks run one by one."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxnets
from flaxnets import functional, layers, xla_cpu
from flaxnets.layers import BlockStack, unrolled_stacks
from flaxnets.xla_cpu import batch_norm as xbn, conv as xconv
from flaxnets.xla_cpu.conv import _loop_conv


@pytest.fixture(autouse=True)
def xla_convs():
    """These tests pin the XLA:CPU forms: of the convs oneDNN does not take, and of every conv where
    the oneDNN ones are off or not built (tests/test_onednn.py covers those)."""
    with xla_cpu.without("onednn_convs"):
        yield


# batch 7 with a budget of 1 byte: the kernel gradient in 3 slices of 2-3 images when sliced
@pytest.mark.parametrize("n,padding,sliced", [(3, ((1, 1), (1, 1)), True), (7, ((0, 0), (0, 0)), True),
                                              (7, ((2, 1), (0, 2)), True), (7, ((2, 1), (0, 2)), False)])
def test_loop_conv_equals_lax_conv_with_its_gradients(n, padding, sliced, monkeypatch):
    monkeypatch.setattr(xconv, "SLICE_BYTES", 1)
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n, 9, 8, 5))
    k = jax.random.normal(kk, (3, 3, 5, 4))

    def lax_conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    want, want_vjp = jax.vjp(lax_conv, x, k)
    got, got_vjp = jax.vjp(lambda x, k: _loop_conv(x, k, padding, sliced), x, k)
    g = jax.random.normal(kg, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_vjp(g), want_vjp(g)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)



def _against_lax(x: jax.Array, k: jax.Array, args: xconv._ConvArgs, key: jax.Array, conv=None):
    """``conv``'s (output, dx, dk) — ``_cpu_conv`` with ``args`` unless given — and
    ``lax.conv_general_dilated``'s, for one random output gradient."""
    def lax_conv(x, k):
        return jax.lax.conv_general_dilated(x, k, args.strides, args.padding, rhs_dilation=args.rhs_dilation,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=args.groups)

    want, want_vjp = jax.vjp(lax_conv, x, k)
    got, got_vjp = jax.vjp(conv or (lambda x, k: xconv._cpu_conv(x, k, args)), x, k)
    g = jax.random.normal(key, want.shape)
    return (got, *got_vjp(g)), (want, *want_vjp(g))


# With a budget of 1 byte per slice every slice is MIN_SLICE images: batch 37 -> 16 slices of
# 2-3 images, 4 -> 2 slices, 9 -> 4, 6 -> 3. Strides, dilation, asymmetric padding and groups vary.
@pytest.mark.parametrize("n,kernel,strides,padding,dilation,groups", [
    (37, (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), 1),
    (4, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    (9, (3, 2), (1, 2), ((0, 1), (2, 0)), (2, 2), 1),
    (6, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 2),
])
def test_sliced_conv_equals_lax_conv_with_its_gradients(n, kernel, strides, padding, dilation, groups,
                                                         monkeypatch):
    monkeypatch.setattr(xconv, "SLICE_BYTES", 1)
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n, 11, 10, 4))
    k = jax.random.normal(kk, (*kernel, 4 // groups, 6))
    args = xconv._ConvArgs(strides, padding, (1, 1), dilation, groups, None, tap_sum=False, sliced=True,
                            col2im=False)

    (got, dx, dk), (want, want_dx, want_dk) = _against_lax(x, k, args, kg)
    np.testing.assert_array_equal(got, want)  # the forward is XLA's own conv
    np.testing.assert_array_equal(dx, want_dx)
    np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=1e-4)  # summed in another order



@pytest.mark.parametrize("channels,kernel,padding,dilation,sliced", [
    (3, (3, 3), ((1, 1), (1, 1)), (1, 1), True),
    (1, (5, 3), ((0, 2), (1, 0)), (1, 1), False),
    (2, (3, 3), ((2, 2), (2, 2)), (2, 2), True),
])
def test_tap_sum_conv_equals_lax_conv_with_its_gradients(channels, kernel, padding, dilation, sliced,
                                                         monkeypatch):
    monkeypatch.setattr(xconv, "SLICE_BYTES", 1)  # 5 images: 2 slices when sliced
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (5, 12, 9, channels))
    k = jax.random.normal(kk, (*kernel, channels, 7))
    args = xconv._ConvArgs((1, 1), padding, (1, 1), dilation, 1, None, tap_sum=True, sliced=sliced,
                            col2im=False)

    (got, dx, dk), (want, want_dx, want_dk) = _against_lax(x, k, args, kg)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # summed in another order
    np.testing.assert_array_equal(dx, want_dx)  # XLA's own input gradient
    np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (2, 1)])
def test_pointwise_conv_is_a_dot_equal_to_lax_conv_with_its_gradients(strides, monkeypatch):
    dots = []
    real = xconv._pointwise
    monkeypatch.setattr(xconv, "_pointwise", lambda *a: dots.append(1) or real(*a))
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 9, 8, 12))
    k = jax.random.normal(kk, (1, 1, 12, 5))
    unpadded = ((0, 0), (0, 0))
    args = xconv._ConvArgs(strides, unpadded, (1, 1), (1, 1), 1, None, tap_sum=False, sliced=False,
                            col2im=False)

    got, want = _against_lax(x, k, args, kg, lambda x, k: xconv.conv_general_dilated(
        x, k, strides, unpadded, dimension_numbers=xconv._NHWC))
    assert dots == ([1] if jax.default_backend() == "cpu" else [])
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # summed in another order
    dots.clear()
    xconv.conv_general_dilated(x, k, strides, ((1, 1), (1, 1)), dimension_numbers=xconv._NHWC)
    assert dots == []  # padded: XLA's conv


def _conv_forms(monkeypatch) -> list[tuple[tuple[int, ...], bool, bool, bool, bool]]:
    """Record (kernel shape, tap_sum, sliced, col2im, plain_dk) of every ``_cpu_conv`` traced from now on."""
    calls = []
    real = xconv._cpu_conv
    monkeypatch.setattr(xconv, "_cpu_conv", lambda x, k, a: calls.append(
        (k.shape, a.tap_sum, a.sliced, a.col2im, a.plain_dk)) or real(x, k, a))
    return calls


def test_only_stride_1_convs_of_at_most_3_channels_take_the_tap_sum(monkeypatch):
    calls = _conv_forms(monkeypatch)
    flaxnets.create("lenet", seed=0)(jnp.zeros((4, 28, 28, 1)))  # 5x5 1->6, then 6->16
    for name in ("net", "resnet20"):  # 3->16 3x3 first convs; the rest take more channels
        flaxnets.create(name, seed=0)(jnp.zeros((2, 32, 32, 3)))
    flaxnets.create("densenet121_se", num_classes=2, seed=0).features.conv0(jnp.zeros((2, 32, 32, 3)))
    cpu = jax.default_backend() == "cpu"
    # not DenseNet's conv0 (stride 2); net's and resnet20's batch of 2 is too small to slice
    assert [(shape, sliced) for shape, tap_sum, sliced, *_ in calls if tap_sum] == (
        [((5, 5, 1, 6), True), ((3, 3, 3, 16), False), ((3, 3, 3, 16), False)] if cpu else [])
    calls.clear()
    with xla_cpu.without("tap_sum_convs", "col2im_input_grads", "plain_kernel_grads"):
        flaxnets.create("net", seed=0)(jnp.zeros((2, 32, 32, 3)))
    assert calls == []  # and batch 2 is too small to slice


def test_only_convs_of_at_most_8_input_channels_or_8x8_outputs_take_the_col2im_input_gradient(monkeypatch):
    calls = _conv_forms(monkeypatch)
    flaxnets.create("lenet", seed=0)(jnp.zeros((4, 28, 28, 1)))  # 1->6 (an image: unused), 6->16
    flaxnets.create("net", seed=0)(jnp.zeros((4, 32, 32, 3)))  # 3->16, then 16->8
    cpu = jax.default_backend() == "cpu"
    assert [(shape, col2im) for shape, _, _, col2im, _ in calls] == (
        [((5, 5, 1, 6), True), ((5, 5, 6, 16), True), ((3, 3, 3, 16), True), ((3, 3, 16, 8), False)]
        if cpu else [])
    calls.clear()
    with unrolled_stacks():
        flaxnets.create("resnet20", seed=0)(jnp.zeros((4, 32, 32, 3)))
    # the RGB conv, and stage 3's stride-1 convs on 8x8 (not its stride-2 first one)
    assert [(shape, col2im) for shape, _, _, col2im, _ in calls] == (
        [((3, 3, 3, 16), True)] + [((3, 3, 16, 16), False)] * 6 + [((3, 3, 16, 32), False)]
        + [((3, 3, 32, 32), False)] * 5 + [((3, 3, 32, 64), False)] + [((3, 3, 64, 64), True)] * 5
        if cpu else [])
    calls.clear()
    with xla_cpu.without("col2im_input_grads"):
        flaxnets.create("lenet", seed=0)(jnp.zeros((4, 28, 28, 1)))
    assert [col2im for *_, col2im, _ in calls] == ([False, False] if cpu else [])


@pytest.mark.parametrize("shape,kernel,padding,dilation", [
    ((5, 12, 12, 6), (5, 5, 6, 16), ((0, 0), (0, 0)), (1, 1)),  # LeNet's conv2
    ((3, 10, 9, 4), (3, 3, 4, 8), ((1, 2), (2, 0)), (1, 1)),
    ((2, 11, 11, 5), (3, 2, 5, 3), ((1, 1), (0, 3)), (2, 3)),
])
def test_col2im_input_gradient_equals_xlas(shape, kernel, padding, dilation):
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x, k = jax.random.normal(kx, shape), jax.random.normal(kk, kernel)
    args = xconv._ConvArgs((1, 1), padding, (1, 1), dilation, 1, None, tap_sum=False, sliced=False,
                            col2im=True)

    (got, dx, dk), (want, want_dx, want_dk) = _against_lax(x, k, args, kg)
    np.testing.assert_array_equal(got, want)  # the forward is XLA's own conv
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-4)  # summed in another order
    np.testing.assert_array_equal(dk, want_dk)


@pytest.mark.parametrize("n,kernel,padding,sliced", [
    (9, (3, 3, 16, 8), ((1, 1), (1, 1)), True),  # net's conv2, in 4 slices
    (5, (5, 5, 6, 16), ((0, 0), (0, 0)), False),  # LeNet's conv2
    (6, (3, 2, 4, 5), ((2, 0), (1, 3)), True),
])
def test_plain_kernel_gradient_equals_xlas(n, kernel, padding, sliced, monkeypatch):
    monkeypatch.setattr(xconv, "SLICE_BYTES", 1)  # slices of MIN_SLICE images
    used = []
    real = xconv._plain_kernel_grad
    monkeypatch.setattr(xconv, "_plain_kernel_grad", lambda *a: used.append(a[3]) or real(*a))
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x, k = jax.random.normal(kx, (n, 12, 11, kernel[2])), jax.random.normal(kk, kernel)
    args = xconv._ConvArgs((1, 1), padding, (1, 1), (1, 1), 1, None, tap_sum=False, sliced=sliced,
                            col2im=False, plain_dk=True)

    (got, dx, dk), (want, want_dx, want_dk) = _against_lax(x, k, args, kg)
    assert used == [sliced]
    np.testing.assert_array_equal(got, want)  # the forward and input gradient are XLA's own
    np.testing.assert_array_equal(dx, want_dx)
    assert dk.shape == k.shape
    np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=1e-4)  # summed in another order


def test_only_stride_1_convs_of_4_to_32_input_channels_take_the_plain_kernel_gradient(monkeypatch):
    calls = _conv_forms(monkeypatch)
    flaxnets.create("lenet", seed=0)(jnp.zeros((4, 28, 28, 1)))
    flaxnets.create("net", seed=0)(jnp.zeros((4, 32, 32, 3)))
    with unrolled_stacks():
        flaxnets.create("resnet20", seed=0)(jnp.zeros((4, 32, 32, 3)))
    plain = [shape for shape, *_, plain_dk in calls if plain_dk]
    # not the first convs (tap sums of 1-3 channels), the stride-2 ones nor the 64-channel stage
    assert plain == ([(5, 5, 6, 16), (3, 3, 16, 8)] + [(3, 3, 16, 16)] * 6 + [(3, 3, 32, 32)] * 5
                     if jax.default_backend() == "cpu" else [])
    calls.clear()
    with xla_cpu.without("plain_kernel_grads"):
        flaxnets.create("net", seed=0)(jnp.zeros((4, 32, 32, 3)))
    assert not any(plain_dk for *_, plain_dk in calls)


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-12), (jnp.float32, 2e-5)])
def test_written_out_batch_norm_backward_equals_autodiffs(dtype, tol):
    def autodiff(x, scale, bias):
        mean, var = functional.batch_stats(x)
        return functional.normalised(x, mean, var, scale, bias, 1e-5), mean, var

    with jax.enable_x64(dtype == jnp.float64):
        ks = jax.random.split(jax.random.key(0), 6)
        x = 3 * jax.random.normal(ks[0], (5, 4, 3, 7), dtype) + 1
        scale, bias = jax.random.normal(ks[1], (7,), dtype), jax.random.normal(ks[2], (7,), dtype)
        # cotangents of all three outputs: y, and the mean and variance (stop_gradient in the module)
        cts = tuple(jax.random.normal(k, s, dtype) for k, s in zip(ks[3:], (x.shape, (7,), (7,))))
        got, got_vjp = jax.vjp(lambda *a: xbn._batch_norm(*a, 1e-5), x, scale, bias)
        want, want_vjp = jax.vjp(autodiff, x, scale, bias)
        chex.assert_trees_all_equal_dtypes(got + got_vjp(cts), want + want_vjp(cts))
        chex.assert_trees_all_close(got + got_vjp(cts), want + want_vjp(cts), rtol=tol, atol=tol)
        chex.assert_type(got[0], dtype)


def test_only_training_batch_norms_of_32_or_more_channels_take_the_written_out_backward(monkeypatch):
    channels = []
    real = xbn._batch_norm
    monkeypatch.setattr(xbn, "_batch_norm", lambda x, *a: channels.append(x.shape[-1]) or real(x, *a))
    model = flaxnets.create("net_batchnorm", seed=0)  # BatchNorm of 32, then of 16 channels
    x = jnp.zeros((4, 32, 32, 3))
    model(x)
    assert channels == ([32] if jax.default_backend() == "cpu" else [])
    channels.clear()
    model.eval()
    model(x)  # running statistics: no batch statistics to differentiate
    model.train()
    with xla_cpu.without("batch_norm_grads"):
        model(x)
    assert channels == []


def test_slices_fill_the_budget_within_their_limits():
    budget = xconv.SLICE_BYTES
    assert xconv._slice_edges(256, budget // 16) == list(range(0, 257, 16))  # 16 images a slice
    assert xconv._slice_edges(256, budget // 100) == [0, 85, 170, 256]  # 3 even slices of <= 100
    assert xconv._slice_edges(64, budget // 2)[:3] == [0, 4, 8]  # at most MAX_SLICES (16) ...
    assert xconv._slice_edges(16, 10 * budget) == list(range(0, 17, 2))  # ... of at least 2 images
    assert xconv._slice_edges(64, budget // 64) == [0, 64]  # the batch fits: one slice
    assert xconv._slice_edges(3, 10 * budget) == [0, 3]


def test_convs_with_spatial_kernels_take_the_sliced_gradient_on_the_cpu(monkeypatch):
    forms = _conv_forms(monkeypatch)
    model = flaxnets.create("resnet20", option="B", seed=0)  # 3x3 convs and 1x1 projections
    with unrolled_stacks():  # in a scan, the loop conv takes over (test below)
        model(jnp.zeros((4, 32, 32, 3)))
    kernels = [m.kernel.shape for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]
    assert {k[:2] for k in kernels} == {(3, 3), (1, 1)}
    spatial = sorted(k for k in kernels if k[:2] == (3, 3))  # conv1 (RGB) too, after its tap sum
    assert sorted(shape for shape, _, sliced, *_ in forms if sliced) == (
        spatial if jax.default_backend() == "cpu" else [])
    forms.clear()
    with unrolled_stacks():
        model(jnp.zeros((3, 32, 32, 3)))  # fewer than two slices of MIN_SLICE images: not split
        with xla_cpu.without("sliced_kernel_grads"):
            model(jnp.zeros((4, 32, 32, 3)))
    # the RGB conv's tap sum, the 8x8 stage's col2im input gradients and the stride-1 16- and
    # 32-channel convs' plain kernel gradients (no slices either way)
    assert len(forms) == (2 * (1 + 5 + 11) if jax.default_backend() == "cpu" else 0)  # per pass
    assert not any(sliced for _, _, sliced, *_ in forms)


def _loss_and_state(model: nnx.Module, x: jax.Array, y: jax.Array, unrolled: bool):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest):
        m = nnx.merge(graphdef, params, rest, copy=True)
        if unrolled:
            with unrolled_stacks():
                logits = m(x)
        else:
            logits = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, nnx.state(m))

    (value, (logits, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest)
    return value, logits, state, grads


@pytest.mark.slow
@pytest.mark.parametrize("train", [True, False])
def test_scanned_stages_compute_what_unrolled_ones_do(train):
    # resnet32: 4 identical blocks per stage tail, so the stages do scan (SCAN_MIN_BLOCKS aside)
    model = flaxnets.create("resnet32", seed=0)
    stacks = [m for _, m in nnx.iter_modules(model) if isinstance(m, BlockStack)]
    assert len(stacks) == 3
    for s in stacks:
        s.scan_min = 2
    model.train() if train else model.eval()
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    y = jnp.arange(4) % 10
    a = _loss_and_state(model, x, y, unrolled=True)
    b = _loss_and_state(model, x, y, unrolled=False)
    np.testing.assert_allclose(b[1], a[1], rtol=1e-5, atol=1e-5)  # logits
    # updated BN statistics (train) or untouched ones (eval) land in every block alike
    chex.assert_trees_all_close(b[2], a[2], rtol=1e-5, atol=1e-6)  # same structure, paths named
    for (pa, ga), (_, gb) in zip(jax.tree.leaves_with_path(a[3]), jax.tree.leaves_with_path(b[3])):
        scale = max(1.0, float(jnp.max(jnp.abs(ga))))
        assert float(jnp.max(jnp.abs(ga - gb))) <= 1e-4 * scale, jax.tree_util.keystr(pa)


def test_the_scan_uses_the_loop_conv_and_only_inside_it(monkeypatch):
    calls = []
    real = xconv._loop_conv
    monkeypatch.setattr(xconv, "_loop_conv", lambda *a: calls.append(a[3]) or real(*a))  # a[3]: sliced
    model = flaxnets.create("resnet32", seed=0)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, BlockStack):
            m.scan_min = 2
    model(jnp.zeros((1, 32, 32, 3)))
    cpu = jax.default_backend() == "cpu"
    assert calls == [True] * (2 * 3 if cpu else 0)  # two convs per block, traced once per stage
    calls.clear()
    with xla_cpu.without("sliced_kernel_grads"):
        model(jnp.zeros((1, 32, 32, 3)))
    assert calls == [False] * (2 * 3 if cpu else 0)
    calls.clear()
    with unrolled_stacks():
        model(jnp.zeros((1, 32, 32, 3)))
    assert calls == []


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape,k", [((2, 8, 8, 3), 2), ((2, 9, 7, 4), 2), ((1, 12, 12, 2), 3)])
def test_tiled_pooling_equals_reduce_window(kind, shape, k):
    x = jax.random.normal(jax.random.key(0), shape)
    g = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // k, shape[2] // k, shape[3]))
    assert (xla_cpu.pool(x, kind, k, k, 0) is not None) == (jax.default_backend() == "cpu")
    got, got_vjp = jax.vjp(lambda x: layers.pool2d(x, kind, k), x)
    with xla_cpu.without("tiled_pools"):
        assert xla_cpu.pool(x, kind, k, k, 0) is None
        want, want_vjp = jax.vjp(lambda x: layers.pool2d(x, kind, k), x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_vjp(g)[0], want_vjp(g)[0], rtol=1e-6, atol=1e-6)


def test_tiled_max_pool_gives_a_tied_windows_gradient_to_its_first_maximum_as_torch():
    import torch

    x = np.array([[1.0, 3.0, 3.0, 0.0], [3.0, 2.0, 5.0, 5.0]], np.float32)  # ties in both windows
    x = np.tile(x[None, :, :, None], (1, 1, 1, 2))  # (1, 2, 4, 2) NHWC
    grad = jax.grad(lambda x: jnp.sum(layers.pool2d(x, "max", 2)))(jnp.asarray(x))
    tx = torch.tensor(np.transpose(x, (0, 3, 1, 2)), requires_grad=True)
    torch.nn.functional.max_pool2d(tx, 2).sum().backward()
    np.testing.assert_array_equal(np.asarray(grad), np.transpose(tx.grad.numpy(), (0, 2, 3, 1)))
    assert float(jnp.sum(grad)) == 4.0  # one unit per window and channel, not split among ties


def test_a_block_stack_refuses_to_scan_blocks_that_differ():
    model = flaxnets.create("resnet32", seed=0)
    model.layer1[2].bn1.use_running_average = True  # one block in eval mode, the others not
    with pytest.raises(ValueError, match="differ in structure or settings"):
        model(jnp.zeros((1, 32, 32, 3)))
