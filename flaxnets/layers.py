"""Shared Flax NNX blocks that mirror torch.nn modules: names, initialisers and numerics.

Every block here exists so that a Flax module path equals the torch ``state_dict`` prefix of the
same layer and so that a freshly initialised Flax net draws from the torch distributions.
Inputs are NHWC float32 throughout.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen import avg_pool, max_pool

Array = jax.Array
Initializer = Callable[..., Array]


# --------------------------------------------------------------------------- initialisers
def _drawn(sample: Callable[..., Array], key: Array, shape: Sequence[int], dtype: Any,
           scale: float = 1.0) -> Array:
    """``scale * sample(key, shape, dtype)``, drawn as a flat power-of-two vector cut to ``shape``.

    Eager JAX compiles one program per random shape (and per shape of every op after it):
    creating DenseNet-121 compiled 108, 14 s of its 23 s (2-core CPU). With JAX's default
    partitionable threefry, element i of a draw depends on i alone, so a prefix of a longer draw
    is the very same numbers (tested) and a few lengths cover every layer; the cut and the scale
    happen on the host. Traced (jit, eval_shape) it draws ``shape`` directly.
    """
    if jax.config.jax_threefry_partitionable and not isinstance(key, jax.core.Tracer):
        n = math.prod(shape)
        flat = sample(key, (1 << max(n - 1, 0).bit_length(),), dtype)
        if not isinstance(flat, jax.core.Tracer):  # a concrete key closed over in a trace
            flat = np.asarray(flat)
            return jax.device_put(flat[:n].reshape(shape) * flat.dtype.type(scale))
    return scale * sample(key, shape, dtype)


def torch_uniform(fan_in: int) -> Initializer:
    """U(±1/sqrt(fan_in)): torch's default for Conv2d/Linear weights *and* biases.

    (kaiming_uniform_ with a=sqrt(5) reduces to exactly this bound.)
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
        return _drawn(functools.partial(jax.random.uniform, minval=-bound, maxval=bound),
                      key, shape, dtype)

    return init


def kaiming_normal(fan_in: int) -> Initializer:
    """torch.nn.init.kaiming_normal_ defaults: N(0, 2/fan_in), *untruncated*.

    jax's variance_scaling(2, 'fan_in', 'normal') is truncated at 2σ and has a different std,
    so it would not match torch's distribution.
    """
    std = math.sqrt(2.0 / fan_in)

    def init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
        return _drawn(jax.random.normal, key, shape, dtype, std)

    return init


def _weight_init(kind: str, fan_in: int) -> Initializer:
    if kind == "torch":
        return torch_uniform(fan_in)
    if kind == "kaiming_normal":
        return kaiming_normal(fan_in)
    raise ValueError(f"unknown weight init {kind!r}; expected 'torch' or 'kaiming_normal'")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


# --------------------------------------------------------------------------- trace-time flags
_in_scan = [False]  # True while a BlockStack traces its scanned block

# The speed-ups of this module, by name; each gives the same function as what it replaces.
# ``without`` turns some off (read when a step is traced), so that a benchmark can measure
# each against its absence in one process (scripts/bench.py --without).
SPEEDUPS = {
    "scanned_stages": "identical blocks of a BlockStack run as one lax.scan (any backend)",
    "sliced_kernel_grads": "CPU: conv kernel gradients summed over L2-sized slices of the batch",
    "tap_sum_convs": "CPU: stride-1 convs of at most 3 input channels as a sum of shifted inputs",
    "tiled_pools": "CPU: non-overlapping pools as a reshape and a reduction",
    "cpu_compile_options": "CPU: per-net XLA compile options measured faster (flaxnets.train)",
    "col2im_input_grads": "CPU: input gradients of stride-1 convs of at most 8 input channels or"
                          " 8x8 outputs as a matrix product and a sum of shifted blocks",
    "pointwise_dots": "CPU: unpadded 1x1 convs as a matrix product over channels",
    "plain_kernel_grads": "CPU: kernel gradients of stride-1 convs of 4-32 input channels as a plain"
                          " conv with the images as its features",
    "batch_norm_grads": "CPU: the training-mode BatchNorm backward of 32 or more channels written out"
                        " (two reductions and one elementwise pass)",
}
_off: list[frozenset[str]] = [frozenset()]


@contextlib.contextmanager
def _pushed(stack: list[Any], value: Any) -> Iterator[None]:
    """Give a trace-time setting (a stack, so blocks nest) ``value`` for the duration of the block."""
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def without(*names: str) -> Iterator[None]:
    """Within the block, models trace without the named ``SPEEDUPS``."""
    unknown = [n for n in names if n not in SPEEDUPS]
    if unknown:
        raise ValueError(f"unknown speed-up {unknown[0]!r}; valid: {', '.join(SPEEDUPS)}")
    with _pushed(_off, _off[-1] | set(names)):
        yield


def speedup_on(name: str) -> bool:
    """Whether the speed-up ``name`` applies to what is traced or compiled now (see ``without``)."""
    return name not in _off[-1]


_on = speedup_on


def unrolled_stacks() -> contextlib.AbstractContextManager[None]:
    """Within the block, every ``BlockStack`` runs its blocks one by one (no scan).

    For tools that need each block's output (``introspect.record_outputs``): inside a scan, a
    block's output is only a tracer of the loop body.
    """
    return without("scanned_stages")


# --------------------------------------------------------------------------- convolution


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, **kw: Any) -> Array:
    """``lax.conv_general_dilated``; on the CPU, in forms XLA:CPU runs faster (same function).

    An unpadded 1x1 conv is a matrix product (``_pointwise``). Inside a BlockStack scan a
    stride-1 conv is ``_loop_conv``; elsewhere an NHWC conv of at most 3 input channels (an
    image) runs forward as a tap sum, one of at most 8 input channels or 8x8 outputs takes its
    input gradient as col2im, and one with a spatial kernel takes its kernel gradient in slices,
    as a plain conv for 4-32 input channels (``_cpu_conv``, see SPEEDUPS). GPU/TPU keep XLA's own.
    """
    strides, pads = tuple(window_strides), tuple(tuple(p) for p in padding)
    lhs_dil, rhs_dil = tuple(lhs_dilation or (1, 1)), tuple(rhs_dilation or (1, 1))
    cpu_nhwc = (jax.default_backend() == "cpu" and dimension_numbers == _NHWC
                and not kw.get("preferred_element_type") and kw.get("out_sharding") is None)
    plain = strides == lhs_dil == (1, 1) and feature_group_count == 1  # stride 1, no input dilation
    if (cpu_nhwc and _on("pointwise_dots") and rhs.shape[:2] == (1, 1) and lhs_dil == (1, 1)
            and feature_group_count == 1 and pads == ((0, 0), (0, 0))):
        return _pointwise(lhs, rhs, strides, kw.get("precision"))
    if cpu_nhwc and _in_scan[-1]:
        if plain and rhs_dil == (1, 1):
            return _loop_conv(lhs, rhs, pads, _on("sliced_kernel_grads"))
    elif cpu_nhwc:
        tap_sum = _on("tap_sum_convs") and plain and rhs.shape[2] <= TAP_SUM_MAX_CHANNELS
        sliced = (_on("sliced_kernel_grads") and rhs.shape[0] * rhs.shape[1] > 1
                  and lhs.shape[0] >= 2 * MIN_SLICE)
        out_pixels = math.prod(lhs.shape[1 + d] + sum(pads[d]) - rhs_dil[d] * (rhs.shape[d] - 1)
                               for d in (0, 1))
        col2im = (_on("col2im_input_grads") and plain
                  and (rhs.shape[2] <= COL2IM_MAX_CHANNELS or out_pixels <= COL2IM_MAX_PIXELS))
        plain_dk = (_on("plain_kernel_grads") and plain and rhs_dil == (1, 1)
                    and TAP_SUM_MAX_CHANNELS < rhs.shape[2] <= PLAIN_KERNEL_GRAD_MAX_CHANNELS)
        if tap_sum or sliced or col2im or plain_dk:
            return _cpu_conv(lhs, rhs, _ConvArgs(strides, pads, lhs_dil, rhs_dil, feature_group_count,
                                                 kw.get("precision"), tap_sum, sliced, col2im, plain_dk))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, **kw)


def _pointwise(x: Array, k: Array, strides: tuple[int, int], precision: Any) -> Array:
    """An unpadded 1x1 NHWC conv as one matrix product over channels (strided: of the kept pixels).

    XLA:CPU's gradient convolutions of a 1x1 conv copy its kernel transposed first, element by
    element (DenseNet-121: ~60 such copies per step); a dot's gradients take it as it is.
    """
    if strides != (1, 1):
        x = x[:, ::strides[0], ::strides[1], :]
    return jnp.dot(x, k[0, 0], precision=precision)


# NHWC input/output, HWIO kernel, in the form nnx.Conv passes (the rank-4 shapes are placeholders)
_NHWC = jax.lax.conv_dimension_numbers((1,) * 4, (1,) * 4, ("NHWC", "HWIO", "NHWC"))


def _taps(x: Array, kernel: tuple[int, int], padding: tuple[tuple[int, int], ...],
          dilation: tuple[int, int]) -> list[Array]:
    """The windows of the padded input that each kernel tap (i, j) sees in a stride-1 conv,
    in HWIO order: ``conv(x, k) == sum over taps of window @ k[i, j]``."""
    (kh, kw), (dh, dw) = kernel, dilation
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    oh, ow = xp.shape[1] - dh * (kh - 1), xp.shape[2] - dw * (kw - 1)
    return [xp[:, i * dh:i * dh + oh, j * dw:j * dw + ow, :] for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _loop_conv(x: Array, k: Array, padding: tuple[tuple[int, int], ...], sliced: bool) -> Array:
    """Stride-1 NHWC×HWIO convolution whose gradients are written out for XLA:CPU loop bodies.

    XLA's CPU backend lowers the gradient convolutions of a loop body to naive loops: a scan of
    four 3×3 16→16 convs on 128×32×32 took 6.5 s for its gradients (1.9 s with the kernel
    gradient sliced as outside loops), 0.16–0.19 s with these; unrolled, 0.17–0.24 s (measured
    here, 2026-11-22). With them the scanned ResNets train as fast as unrolled ones from 4
    identical blocks on (resnet_cifar's SCAN_MIN_BLOCKS).
    """
    return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=_NHWC)


def _loop_conv_fwd(x: Array, k: Array, padding: tuple[tuple[int, int], ...], sliced: bool
                   ) -> tuple[Array, tuple[Array, Array]]:
    return _loop_conv(x, k, padding, sliced), (x, k)


def _loop_conv_bwd(padding: tuple[tuple[int, int], ...], sliced: bool, res: tuple[Array, Array], g: Array
                   ) -> tuple[Array, Array]:
    x, k = res
    kh, kw = k.shape[:2]
    (pt, pb), (pl, pr) = padding
    # input gradient: the full correlation of g with the flipped, in/out-swapped kernel, as a
    # plain NHWC/HWIO conv (JAX's own form swaps the kernel's dimension labels instead)
    kt = jnp.transpose(jnp.flip(k, (0, 1)), (0, 1, 3, 2))
    dx = jax.lax.conv_general_dilated(g, kt, (1, 1), ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)),
                                      dimension_numbers=_NHWC)
    return dx, _plain_kernel_grad(x, g, padding, sliced)


def _plain_kernel_grad(x: Array, g: Array, padding: tuple[tuple[int, int], ...], sliced: bool) -> Array:
    """The kernel gradient (HWIO) of a stride-1 NHWC conv: per slice of the batch (_grad_slices,
    when ``sliced``), the correlation of the padded input with the output gradient written as a
    plain NHWC conv, input channels as its batch and images as its features.

    XLA:CPU runs this form well inside a loop body, unlike its own gradient form. Scans of four
    3x3 convs on 128 images (gradients, interleaved): 16->16 on 32x32 236-307 -> 161-191 ms,
    32->32 on 16x16 133-143 -> 123-142, 64->64 on 8x8 134-140 -> 111-121 against one matrix
    product per tap of the whole batch (the previous form); unsliced, 442, 280, 193. Outside
    loops, see PLAIN_KERNEL_GRAD_MAX_CHANNELS.
    """
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    edges = _grad_slices(x, g) if sliced else [0, x.shape[0]]
    dk = functools.reduce(jnp.add, (
        jax.lax.conv_general_dilated(jnp.transpose(xp[a:b], (3, 1, 2, 0)), jnp.transpose(g[a:b], (1, 2, 0, 3)),
                                     (1, 1), "VALID", dimension_numbers=_NHWC)  # (ci, kh, kw, co)
        for a, b in zip(edges, edges[1:])))
    return jnp.transpose(dk, (1, 2, 0, 3))


_loop_conv.defvjp(_loop_conv_fwd, _loop_conv_bwd)


# A conv of 1-3 input channels (the first conv of a net) as a sum over taps and channels of a
# shifted input channel times a row of the kernel: one elementwise loop that XLA fuses and runs
# on both cores, where its own conv of so few channels runs on one. Measured here (2-core Xeon,
# jax 0.10.2), forward / forward + kernel gradient, XLA's conv -> tap sum: LeNet 5x5 1->6 on
# 256x28x28 9.7/18.5 -> 1.7/8.8 ms; the dilated net's 3x3 1->16 (dilation 2) on 64x28x28
# 8.9/11.1 -> 0.5/2.1; 3x3 3->16 on 128x32x32 8.3/13.8 -> 2.7/6.0 (im2col, the previous form for
# 3 channels: 9.4/11.2); 3x3 3->64 on 16x32x32 4.0/4.6 -> 1.8/3.7. From 6 channels on it loses
# (LeNet's 5x5 6->16 with its gradients: 16.7 -> 19.0 ms; 3x3 8->16: 4.1 -> 4.6).
TAP_SUM_MAX_CHANNELS = 3
# XLA:CPU computes the input gradient of LeNet's conv2 (5×5, 6→16, on 256×12×12) as an Eigen
# convolution of 6 output channels, ~4× slower per multiply-add than the forward (10-14 ms
# against 2.5 ms alone). As one matrix product g @ k^T (16 -> 150 columns) and a fused sum of
# the 25 taps' shifted blocks (_col2im_dx), the LeNet step took 20.5 against 25.7 ms: 1.31x
# median over 30 alternating rounds of 8 steps (2026-11-22). Wider inputs gain nothing: with
# the rule at 64 channels, dilated (conv2 16→32) 1.02x and resnet20 (16→16 ...) 0.99x, noise.
COL2IM_MAX_CHANNELS = 8
# Small images too, whatever their channels: XLA:CPU's input gradient there is mostly overhead
# (it first copies the kernel reversed and transposed, element by element). DenseNet-121's 3x3
# 128->32 convs, all on 8x8 or smaller at the benchmark's 32x32 input: 1.14x per step with this
# rule (median of 16 alternating rounds, IQR 0.97-1.25; 1.20x in another 16); at 64x64 input
# (block 1 at 16x16 keeps XLA's) 1.06x; resnet20 (its 8x8 stage takes it) 1.00x; every conv of
# any size taking it: densenet121 at 64x64 1.06x, resnet20 0.99x (2026-11-23).
COL2IM_MAX_PIXELS = 64  # output pixels per image
# Outside loops too, the kernel gradient of a stride-1 conv of a few input channels is faster as
# _plain_kernel_grad (sliced alike) than as XLA's own gradient conv over the same slices (both
# copy each slice transposed first; in net_dropout XLA's copies recompute the max pool and dropout,
# 0.5-0.8 ms apiece; why its form is slower was not pinned down). Per step, median of alternating
# rounds of 10 steps (2026-11-23), a patched engine (12-24 rounds) then the switch (16): net_width
# (conv2 32->16 on 16x16) 1.12x / 1.09x, net_batchnorm 1.10x / 1.08x, net_dropout 1.09x / 1.10x,
# net (16->8) 1.03x / 1.03x, lenet (5x5 6->16) 1.03x, dilated (dilated convs: untouched) 1.02x;
# resnet20 (its unscanned 16- and 32-channel convs) 0.99x. DenseNet's 128->32 lose (0.90x), and
# so do the first convs of 3 channels (net with them: 0.75x), hence 4-32 channels.
PLAIN_KERNEL_GRAD_MAX_CHANNELS = 32


def _tap_sum(x: Array, k: Array, padding: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> Array:
    """A stride-1 NHWC×HWIO conv as the sum over taps (i, j) and input channels c of the
    window's channel c times ``k[i, j, c]`` (see above)."""
    kh, kw, ci, _ = k.shape
    windows = _taps(x, (kh, kw), padding, dilation)
    return functools.reduce(jnp.add, (w[..., c:c + 1] * k[t // kw, t % kw, c]
                                      for t, w in enumerate(windows) for c in range(ci)))


# The kernel gradient of a conv, on the CPU, as a sum over slices of the batch. XLA:CPU runs a
# conv's kernel gradient on one thread and slowly once the batch's activations outgrow the L2
# cache; a slice whose input and output gradient fit in about half of it (512 KiB) stays in
# cache, and independent slices run on both cores. Measured here (2-core Xeon, 1.25 MiB L2 per
# core, jax 0.10.2), kernel gradient alone, whole batch -> best slicing: LeNet conv1 1->6 5x5
# on 256x28x28 16.3 -> 4.5 ms (16 slices), conv2 6->16 7.5 -> 2.2 ms; ResNet 3x3 16->16 on
# 128x32x32 28.3 -> 12.2 ms, 32->32 on 16x16 27.4 -> 11.0 ms, 64->64 on 8x8 19.7 -> 9.4 ms;
# DenseNet 3x3 128->32 on 16x32x32 37.3 -> 18.8 ms (2 images per slice; 1 image: 25 ms).
# Too small a slice loses (3x3 16->8 on 64x16x16: 1.8 ms whole, 1.6 in 2 slices, 7.2 in 16),
# hence the budget per slice rather than a fixed count. No gain for 1x1 kernels (a plain
# matrix product) nor for the input gradient, which keep XLA's own form.
SLICE_BYTES = 512 * 1024  # input + output gradient of one slice
MIN_SLICE = 2  # images
MAX_SLICES = 16  # each slice is one more conv in the compiled step


def _slice_edges(n: int, image_bytes: int) -> list[int]:
    """Batch boundaries of the kernel-gradient slices: about SLICE_BYTES each, at least
    MIN_SLICE images, at most MAX_SLICES slices (one slice: the whole batch)."""
    per = max(MIN_SLICE, SLICE_BYTES // max(1, image_bytes))
    slices = max(1, min(MAX_SLICES, n // MIN_SLICE, -(-n // per)))
    return [n * i // slices for i in range(slices + 1)]


def _grad_slices(x: Array, g: Array) -> list[int]:
    """``_slice_edges`` for a conv's input ``x`` and output gradient ``g``."""
    return _slice_edges(x.shape[0], (math.prod(x.shape[1:]) + math.prod(g.shape[1:])) * x.dtype.itemsize)


class _ConvArgs(NamedTuple):
    """A ``_cpu_conv``'s static arguments: the conv's own, then which CPU forms it takes."""

    strides: tuple[int, int]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, int]
    rhs_dilation: tuple[int, int]
    groups: int
    precision: Any
    tap_sum: bool  # forward as _tap_sum (stride 1, groups 1, no input dilation)
    sliced: bool  # kernel gradient summed over _slice_edges slices of the batch
    col2im: bool  # input gradient as _col2im_dx (stride 1, groups 1, no input dilation)
    plain_dk: bool = False  # kernel gradient as _plain_kernel_grad (stride 1, groups 1, no dilation)


def _lax_conv(x: Array, k: Array, a: _ConvArgs) -> Array:
    return jax.lax.conv_general_dilated(x, k, a.strides, a.padding, a.lhs_dilation, a.rhs_dilation,
                                        _NHWC, a.groups, precision=a.precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_conv(x: Array, k: Array, a: _ConvArgs) -> Array:
    """An NHWC conv in the CPU forms ``a`` names (see above)."""
    return _tap_sum(x, k, a.padding, a.rhs_dilation) if a.tap_sum else _lax_conv(x, k, a)


def _cpu_conv_fwd(x: Array, k: Array, a: _ConvArgs) -> tuple[Array, tuple[Array, Array]]:
    return _cpu_conv(x, k, a), (x, k)


def _cpu_conv_bwd(a: _ConvArgs, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, k = res
    # XLA drops dx where nothing uses it (the first conv's input images)
    if a.col2im:
        dx = _col2im_dx(g, k, x.shape, a.padding, a.rhs_dilation)
    else:
        dx = jax.vjp(lambda v: _lax_conv(v, k, a), x)[1](g)[0]
    if a.plain_dk:
        return dx, _plain_kernel_grad(x, g, a.padding, a.sliced)
    edges = _grad_slices(x, g) if a.sliced else [0, x.shape[0]]
    dk = functools.reduce(jnp.add, (jax.vjp(lambda w, s=s, e=e: _lax_conv(x[s:e], w, a), k)[1](g[s:e])[0]
                                    for s, e in zip(edges, edges[1:])))
    return dx, dk


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _col2im_dx(g: Array, k: Array, x_shape: tuple[int, ...], padding: tuple[tuple[int, int], ...],
               dilation: tuple[int, int]) -> Array:
    """The input gradient of a stride-1 NHWC conv as one matrix product, g @ k^T per output
    position and tap, then a sum of the taps' shifted blocks (one fused loop)."""
    (kh, kw, ci, co), (_, h, w, _) = k.shape, x_shape
    n, oh, ow, _ = g.shape
    cols = jnp.dot(g.reshape(-1, co), k.reshape(-1, co).T).reshape(n, oh, ow, kh, kw, ci)
    out = None
    for i in range(kh):
        for j in range(kw):
            lo_h, lo_w = i * dilation[0] - padding[0][0], j * dilation[1] - padding[1][0]
            part = jax.lax.pad(cols[:, :, :, i, j, :], jnp.zeros((), g.dtype),
                               ((0, 0, 0), (lo_h, h - lo_h - oh, 0), (lo_w, w - lo_w - ow, 0), (0, 0, 0)))
            out = part if out is None else out + part
    return out


# --------------------------------------------------------------------------- param layers
def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    bias: bool = True,
    *,
    init: str = "torch",
    bias_init: str = "torch",
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """An ``nnx.Conv`` with torch.nn.Conv2d's arguments, padding and initialisation.

    Padding is explicit ``((p, p), (p, p))``: Flax's 'SAME' pads asymmetrically at stride 2.
    ``init`` is 'torch' (the default U(±1/√fan_in)) or 'kaiming_normal'; ``bias_init`` is
    'torch' or 'zeros'.
    """
    kh, kw = _pair(kernel_size)
    ph, pw = _pair(padding)
    fan_in = in_channels * kh * kw
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kh, kw),
        strides=_pair(stride),
        padding=((ph, ph), (pw, pw)),
        kernel_dilation=_pair(dilation),
        conv_general_dilated=conv_general_dilated,
        use_bias=bias,
        kernel_init=_weight_init(init, fan_in),
        bias_init=torch_uniform(fan_in) if bias_init == "torch" else nnx.initializers.zeros,
        rngs=rngs,
    )


def linear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    *,
    init: str = "torch",
    bias_init: str = "torch",
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """An ``nnx.Linear`` initialised like torch.nn.Linear (kernel stored (in, out))."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=bias,
        kernel_init=_weight_init(init, in_features),
        bias_init=torch_uniform(in_features) if bias_init == "torch" else nnx.initializers.zeros,
        rngs=rngs,
    )


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d semantics in NNX (momentum 0.1, eps 1e-5, NHWC channel last).

    Differs from ``nnx.BatchNorm`` on purpose: the running variance is updated with the
    *unbiased* batch variance (n/(n-1)) as torch does, and ``num_batches_tracked`` is kept so a
    converted ``state_dict`` loads strictly. Normalisation itself uses the biased variance.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = False
        # made on the host: eager jnp.ones compiles a program per channel count (DenseNet: 32);
        # one buffer each, as a donating step must not see a buffer twice
        def full(value: float, shape: tuple[int, ...] = (num_features,), dtype: Any = np.float32):
            return jax.device_put(np.full(shape, value, dtype))

        self.scale = nnx.Param(full(1))
        self.bias = nnx.Param(full(0))
        self.mean = nnx.BatchStat(full(0))
        self.var = nnx.BatchStat(full(1))
        self.num_batches_tracked = nnx.BatchStat(full(0, (), np.int32))

    def __call__(self, x: Array) -> Array:
        scale, bias = self.scale[...], self.bias[...]
        if self.use_running_average:
            return _normalised(x, self.mean[...], self.var[...], scale, bias, self.eps)
        if (jax.default_backend() == "cpu" and _on("batch_norm_grads")
                and x.shape[-1] >= BATCH_NORM_GRAD_MIN_CHANNELS):
            y, mean, var = _batch_norm(x, scale, bias, self.eps)
        else:
            mean, var = _batch_stats(x)
            y = _normalised(x, mean, var, scale, bias, self.eps)
        n = x.size // x.shape[-1]
        m = self.momentum
        unbiased = var * (n / max(n - 1, 1))
        # set_value, not `v[...] = x`: under tracing flax 0.12's __setitem__ probes the
        # tracer's .sharding, whose error message walks the whole jaxpr -- quadratic in
        # depth (resnet1202's eval_shape did not finish in 10 minutes).
        self.mean.set_value((1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean))
        self.var.set_value((1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased))
        self.num_batches_tracked.set_value(self.num_batches_tracked[...] + 1)
        return y


def _batch_stats(x: Array) -> tuple[Array, Array]:
    """Per-channel mean and biased variance of an NHWC batch; the two-pass variance (as torch),
    not E[x²]-E[x]², which loses digits."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    return mean, jnp.mean(jnp.square(x - mean), axis=axes)


def _normalised(x: Array, mean: Array, var: Array, scale: Array, bias: Array, eps: float) -> Array:
    return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias


# BatchNorm's training-mode backward written out: one pass of two reductions (the sums of g and
# g*x_hat) and one elementwise pass, where autodiff of the forward gives four reductions and
# three passes. Per step, median of alternating rounds (2026-11-23): net_batchnorm 1.14-1.17x
# with it on its 32-channel BatchNorm (16 and 20 rounds; the switch, 16 rounds: 1.18x), resnet20
# 1.06x (IQR 1.03-1.14, 10 rounds of 3 steps; the switch: 1.02x; 1.075x with its 16-channel ones
# too), densenet121 1.09x (1.02-1.13, 8 rounds; the switch, 10 rounds: 1.03x). On net_batchnorm's
# 16-channel BatchNorm the step lost (0.71-0.78x), though on that shape alone the written-out
# backward is 1.4x faster than autodiff: an interaction in XLA's fusion, not pinned down. Hence
# from 32 channels.
BATCH_NORM_GRAD_MIN_CHANNELS = 32


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm(x: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm: (normalised x, batch mean, biased batch variance)."""
    mean, var = _batch_stats(x)
    return _normalised(x, mean, var, scale, bias, eps), mean, var


def _batch_norm_fwd(x: Array, scale: Array, bias: Array, eps: float
                    ) -> tuple[tuple[Array, Array, Array], tuple[Array, ...]]:
    y, mean, var = _batch_norm(x, scale, bias, eps)
    return (y, mean, var), (x, mean, var, scale)


def _batch_norm_bwd(eps: float, res: tuple[Array, ...], cts: tuple[Array, Array, Array]
                    ) -> tuple[Array, Array, Array]:
    x, mean, var, scale = res
    g, g_mean, g_var = cts
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    rstd = jax.lax.rsqrt(var + eps)
    centred = x - mean
    x_hat = centred * rstd
    sum_g, sum_gx = jnp.sum(g, axis=axes), jnp.sum(g * x_hat, axis=axes)
    # d/dx of y through x, the mean and the variance; then of the mean and variance outputs
    dx = (scale * rstd) * (g - (sum_g + x_hat * sum_gx) / n) + (g_mean + 2 * g_var * centred) / n
    return dx, sum_gx, sum_g


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


# --------------------------------------------------------------------------- containers
class Sequential(nnx.Module):
    """torch.nn.Sequential with the same child names ('0', '1', … or ``add_module`` names).

    ``nnx.Sequential`` keeps children under ``layers.<i>``; mirroring torch's names instead makes
    the flattened nnx state path equal to the torch ``state_dict`` key.
    """

    def __init__(self, *layers: Callable[[Array], Array]):
        self._order: tuple[str, ...] = ()
        for layer in layers:
            self.add_module(str(len(self._order)), layer)

    def add_module(self, name: str, layer: Callable[[Array], Array]) -> None:
        """Append ``layer`` under ``name`` (torch's ``add_module``)."""
        setattr(self, name, layer)
        self._order = self._order + (name,)

    def __getitem__(self, i: int) -> Callable[[Array], Array]:
        return getattr(self, self._order[i])

    def __len__(self) -> int:
        return len(self._order)

    def __call__(self, x: Array) -> Array:
        for name in self._order:
            x = getattr(self, name)(x)
        return x


class BlockStack(Sequential):
    """torch.nn.Sequential of blocks whose tail (from ``scan_from`` on) is one block repeated.

    Same children and parameters as ``Sequential`` (so conversion and checkpoints do not see it),
    but when the tail has at least ``scan_min`` blocks it runs as one ``lax.scan`` over the blocks'
    stacked variables: XLA then compiles one block instead of every one, which is what lets
    resnet1202 (3 × 199 identical blocks) compile at all. The arithmetic is the same; the updated
    batch statistics are written back to each block.
    """

    def __init__(self, *layers: Callable[[Array], Array], scan_from: int = 1, scan_min: int = 2):
        super().__init__(*layers)
        self.scan_from = scan_from
        self.scan_min = scan_min

    def __call__(self, x: Array) -> Array:
        names = self._order
        head, tail = names[: self.scan_from], [getattr(self, n) for n in names[self.scan_from:]]
        for name in head:
            x = getattr(self, name)(x)
        if not _on("scanned_stages") or len(tail) < max(self.scan_min, 2):
            for block in tail:
                x = block(x)
            return x
        graphdefs, states = zip(*(nnx.split(b) for b in tail))
        graphdef = graphdefs[0]
        if any(g != graphdef for g in graphdefs[1:]):
            raise ValueError("BlockStack: the blocks from scan_from on differ in structure or "
                             "settings (e.g. one left in train mode); they cannot share one scan")
        stacked = jax.tree.map(lambda *v: jnp.stack(v), *states)

        def body(h: Array, state: nnx.State) -> tuple[Array, nnx.State]:
            block = nnx.merge(graphdef, state)
            return block(h), nnx.state(block, nnx.BatchStat)

        with _pushed(_in_scan, True):
            x, stats = jax.lax.scan(body, x, stacked)
        for i, block in enumerate(tail):
            nnx.update(block, jax.tree.map(lambda v: v[i], stats))
        return x


# --------------------------------------------------------------------------- stateless layers
class Activation(nnx.Module):
    """A parameter-free elementwise layer (torch's nn.ReLU / nn.Sigmoid / nn.Tanh)."""

    def __init__(self, fn: Callable[[Array], Array]):
        self.fn = fn

    def __call__(self, x: Array) -> Array:
        return self.fn(x)


def ReLU() -> Activation:  # noqa: N802 - mirrors torch.nn.ReLU
    """nn.ReLU."""
    return Activation(jax.nn.relu)


def Sigmoid() -> Activation:  # noqa: N802
    """nn.Sigmoid."""
    return Activation(jax.nn.sigmoid)


def _windows(x: Array, k: int) -> Array:
    """(N, H, W, C) -> (N, H//k, k, W//k, k, C): a reshape of NHWC, no transpose (floor mode)."""
    n, h, w, c = x.shape
    return x[:, : h // k * k, : w // k * k].reshape(n, h // k, k, w // k, k, c)


def _tiles(x: Array, k: int) -> Array:
    """(N, H, W, C) -> (N, H//k, W//k, C, k*k): the non-overlapping k×k windows (floor mode)."""
    v = _windows(x, k)
    n, hk, _, wk, _, c = v.shape
    return jnp.transpose(v, (0, 1, 3, 5, 2, 4)).reshape(n, hk, wk, c, k * k)


def _max_and_first(x: Array, k: int) -> tuple[Array, Array]:
    """Each k×k window's maximum, and the row-major index of its first maximum (torch's pick)."""
    v = _windows(x, k)
    taps = [v[:, :, a, :, b] for a in range(k) for b in range(k)]
    y = functools.reduce(jnp.maximum, taps)
    first = jnp.full(y.shape, k * k - 1, _tap_index_dtype(k))
    for e in reversed(range(k * k - 1)):
        first = jnp.where(taps[e] == y, e, first)
    return y, first


def _tap_index_dtype(k: int) -> Any:
    return jnp.int8 if k * k <= 127 else jnp.int32  # a quarter of the bytes for the usual 2×2


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max(x: Array, k: int) -> Array:
    """Max over non-overlapping k×k windows; the gradient goes to each window's first maximum.

    A hand-written gradient: the forward keeps only the maximum (and, for the backward, which
    tap was first), the backward is one elementwise select written straight into NHWC. Against
    the autodiff of a one-hot arg-max product (paired A/B, 24-30 alternating rounds of 8 steps,
    2026-11-22): net 1.11x, net_dropout 1.18x, net_batchnorm 1.08x; lenet 0.96-0.98x (its pools
    alone, or pool2 alone, the same; int32 indices no better), within this machine's noise for
    a null change (dilated, whose pools are averages: 0.97x).
    """
    return _max_and_first(x, k)[0]


def _tiled_max_fwd(x: Array, k: int) -> tuple[Array, tuple[Array, Array]]:
    y, first = _max_and_first(x, k)
    return y, (first, jnp.zeros(x.shape[1:3] + (0,)))  # H, W in a shape: a residual of no bytes


def _tiled_max_bwd(k: int, res: tuple[Array, Array], g: Array) -> tuple[Array]:
    first, hw = res
    (n, _, _, c), (h, w, _) = first.shape, hw.shape
    pos = (jnp.arange(k)[:, None, None] * k + jnp.arange(k)[None, None, :]).astype(first.dtype)
    hit = first[:, :, None, :, None, :] == pos[:, :, :, None]  # (N, H/k, k, W/k, k, C)
    d = jnp.where(hit, g[:, :, None, :, None, :], 0).reshape(n, h // k * k, w // k * k, c)
    return (jnp.pad(d, ((0, 0), (0, h % k), (0, w % k), (0, 0))),)  # floor mode: the cut-off rows


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


def _tiled(kernel_size: int, stride: int, padding: int) -> bool:
    """Whether a pool runs as a reshape on this backend (see ``pool2d``)."""
    return jax.default_backend() == "cpu" and _on("tiled_pools") and kernel_size == stride and padding == 0


def pool2d(x: Array, kind: str, kernel_size: int, stride: int | None = None, padding: int = 0) -> Array:
    """Max or average pooling of an NHWC map with torch's semantics (floor mode, -inf padding).

    On the CPU, non-overlapping windows are pooled as a reshape and a reduction: XLA:CPU turns
    a max pool's gradient into an arg-max reduce-window plus a scatter, which took 15 of the
    68 ms of a LeNet training step (profiled here); the reshape form is elementwise. The max
    keeps torch's tie rule (the gradient goes to the first maximum of a window, not split).
    """
    stride = stride or kernel_size
    if _tiled(kernel_size, stride, padding):
        if kind == "avg":
            return jnp.mean(_tiles(x, kernel_size), axis=-1)
        return _tiled_max(x, kernel_size)
    window, strides, pad = (kernel_size,) * 2, (stride,) * 2, ((padding, padding),) * 2
    if kind == "avg":
        return avg_pool(x, window, strides, pad)
    return max_pool(x, window, strides, pad)


class MaxPool2d(nnx.Module):
    """nn.MaxPool2d (padding is -inf, as torch)."""

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride or kernel_size, padding

    def __call__(self, x: Array) -> Array:
        return pool2d(x, "max", self.kernel_size, self.stride, self.padding)


class AvgPool2d(nnx.Module):
    """nn.AvgPool2d without padding (floor mode, as torch)."""

    def __init__(self, kernel_size: int, stride: int | None = None):
        self.kernel_size, self.stride = kernel_size, stride or kernel_size

    def __call__(self, x: Array) -> Array:
        return pool2d(x, "avg", self.kernel_size, self.stride)


def max_pool2d(x: Array, k: int) -> Array:
    """F.max_pool2d(x, k) on NHWC."""
    return pool2d(x, "max", k)


def flatten_nchw(x: Array) -> Array:
    """Flatten an NHWC map in torch's NCHW order, so fc weights convert without permutation.

    This is the single place where the flatten-order trap is handled: the Flax nets transpose
    here instead of the converter permuting fc1 rows per net.
    """
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def global_avg_pool(x: Array) -> Array:
    """Adaptive average pool to 1×1 and flatten: (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))


def dropout2d(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    """nn.Dropout2d on NHWC: one mask value per (sample, channel)."""
    return nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs)


# --------------------------------------------------------------------------- blocks
class SEBlock(nnx.Module):
    """Squeeze-excitation (the material's SEAttention): channel weights from pooled features.

    ``fc`` mirrors torch's ``nn.Sequential(Linear, ReLU, Linear, Sigmoid)`` without biases,
    so its weights are ``se.fc.0.weight`` and ``se.fc.2.weight`` in both frameworks.
    """

    def __init__(self, channel: int = 512, reduction: int = 16, *, rngs: nnx.Rngs):
        hidden = channel // reduction
        self.fc = Sequential(
            linear(channel, hidden, bias=False, rngs=rngs),
            ReLU(),
            linear(hidden, channel, bias=False, rngs=rngs),
            Sigmoid(),
        )

    def __call__(self, x: Array) -> Array:
        y = self.fc(global_avg_pool(x))
        return x * y[:, None, None, :]


# --------------------------------------------------------------------------- from scratch
def corr2d(X: Array, K: Array) -> Array:
    """2-D cross-correlation of one 2-D array with one 2-D kernel (the material's corr2d).

    Vectorised as a sum of shifted slices (one per kernel tap) instead of the note's Python
    double loop, so it is differentiable and jit-friendly; results are identical.
    """
    h, w = K.shape
    oh, ow = X.shape[0] - h + 1, X.shape[1] - w + 1
    X = jnp.asarray(X, jnp.float32)
    K = jnp.asarray(K, jnp.float32)
    out = jnp.zeros((oh, ow), jnp.float32)
    for i in range(h):
        for j in range(w):
            out = out + X[i : i + oh, j : j + ow] * K[i, j]
    return out


class Conv2D(nnx.Module):
    """The material's from-scratch 2-D conv layer: ``corr2d(x, weight) + bias`` (scalar bias).

    Weight and bias are drawn from N(0, 1) as the note's ``torch.randn`` does.
    """

    def __init__(self, kernel_size: tuple[int, int], *, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), tuple(kernel_size), jnp.float32))
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (1,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        return corr2d(x, self.weight[...]) + self.bias[...]
