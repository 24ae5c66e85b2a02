"""Convolutions in the forms XLA:CPU runs faster than its own: the same function, other programs.

``conv_general_dilated`` has ``lax.conv_general_dilated``'s signature (``flaxnets.layers.conv2d``
passes it to ``nnx.Conv``) and picks, per conv, what the measurements below favour; off the CPU,
or for a conv no rule covers, it is XLA's own. See docs/cpu_speedups.md for every A/B.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import flaxnets.xla_cpu.onednn as onednn
from flaxnets.xla_cpu.switch import in_loop_body, speedup_on

Array = jax.Array


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, **kw: Any) -> Array:
    """``lax.conv_general_dilated``; on the CPU, in forms XLA:CPU runs faster (same function).

    An unpadded 1x1 conv is a matrix product (``_pointwise``). A float32 conv of 9-64 input
    channels, one group and no input dilation runs through oneDNN (``onednn.conv``) where its
    library is built and the program runs on one device. Otherwise, inside a BlockStack scan a
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
    if (cpu_nhwc and speedup_on("pointwise_dots") and rhs.shape[:2] == (1, 1) and lhs_dil == (1, 1)
            and feature_group_count == 1 and pads == ((0, 0), (0, 0))):
        return _pointwise(lhs, rhs, strides, kw.get("precision"))
    if (cpu_nhwc and lhs.dtype == rhs.dtype == jnp.float32 and lhs_dil == (1, 1)
            and feature_group_count == 1 and min(min(p) for p in pads) >= 0
            and ONEDNN_MIN_CHANNELS < rhs.shape[2] <= ONEDNN_MAX_CHANNELS and onednn_convs_here()):
        return onednn.conv(lhs, rhs, strides, pads, rhs_dil)
    if cpu_nhwc and in_loop_body():
        if plain and rhs_dil == (1, 1):
            return _loop_conv(lhs, rhs, pads, speedup_on("sliced_kernel_grads"))
    elif cpu_nhwc:
        tap_sum = speedup_on("tap_sum_convs") and plain and rhs.shape[2] <= TAP_SUM_MAX_CHANNELS
        sliced = (speedup_on("sliced_kernel_grads") and rhs.shape[0] * rhs.shape[1] > 1
                  and lhs.shape[0] >= 2 * MIN_SLICE)
        out_pixels = math.prod(lhs.shape[1 + d] + sum(pads[d]) - rhs_dil[d] * (rhs.shape[d] - 1)
                               for d in (0, 1))
        col2im = (speedup_on("col2im_input_grads") and plain
                  and (rhs.shape[2] <= COL2IM_MAX_CHANNELS or out_pixels <= COL2IM_MAX_PIXELS))
        plain_dk = (speedup_on("plain_kernel_grads") and plain and rhs_dil == (1, 1)
                    and TAP_SUM_MAX_CHANNELS < rhs.shape[2] <= PLAIN_KERNEL_GRAD_MAX_CHANNELS)
        if tap_sum or sliced or col2im or plain_dk:
            return _cpu_conv(lhs, rhs, _ConvArgs(strides, pads, lhs_dil, rhs_dil, feature_group_count,
                                                 kw.get("precision"), tap_sum, sliced, col2im, plain_dk))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, **kw)


def onednn_convs_here() -> bool:
    """Whether the program traced now runs its convs of ONEDNN_MIN/MAX_CHANNELS through oneDNN: the
    CPU, one device (the custom calls carry no sharding rule), the speed-up on and its library built."""
    return (jax.default_backend() == "cpu" and speedup_on("onednn_convs") and jax.device_count() == 1
            and onednn.available())


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
    gradient sliced as outside loops), 0.16–0.19 s with these; unrolled, 0.17–0.24 s (2-core Xeon,
    jax 0.10.2). With them the scanned ResNets train as fast as unrolled ones from 3 identical
    blocks on (resnet_cifar's SCAN_MIN_BLOCKS).
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
    product per tap of the whole batch; unsliced, 442, 280, 193. Outside
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
# on both cores, where its own conv of so few channels runs on one. Measured on a 2-core Xeon
# (jax 0.10.2), forward / forward + kernel gradient, XLA's conv -> tap sum: LeNet 5x5 1->6 on
# 256x28x28 9.7/18.5 -> 1.7/8.8 ms; the dilated net's 3x3 1->16 (dilation 2) on 64x28x28
# 8.9/11.1 -> 0.5/2.1; 3x3 3->16 on 128x32x32 8.3/13.8 -> 2.7/6.0 (im2col for 3 channels:
# 9.4/11.2); 3x3 3->64 on 16x32x32 4.0/4.6 -> 1.8/3.7. From 6 channels on it loses
# (LeNet's 5x5 6->16 with its gradients: 16.7 -> 19.0 ms; 3x3 8->16: 4.1 -> 4.6).
TAP_SUM_MAX_CHANNELS = 3
# XLA:CPU computes the input gradient of LeNet's conv2 (5×5, 6→16, on 256×12×12) as an Eigen
# convolution of 6 output channels, ~4× slower per multiply-add than the forward (10-14 ms
# against 2.5 ms alone). As one matrix product g @ k^T (16 -> 150 columns) and a fused sum of
# the 25 taps' shifted blocks (_col2im_dx), the LeNet step took 20.5 against 25.7 ms: 1.31x
# median over 30 alternating rounds of 8 steps. Wider inputs gain nothing: with
# the rule at 64 channels, dilated (conv2 16→32) 1.02x and resnet20 (16→16 ...) 0.99x, noise.
COL2IM_MAX_CHANNELS = 8
# Small images too, whatever their channels: XLA:CPU's input gradient there is mostly overhead
# (it first copies the kernel reversed and transposed, element by element). DenseNet-121's 3x3
# 128->32 convs, all on 8x8 or smaller at the benchmark's 32x32 input: 1.14x per step with this
# rule (median of 16 alternating rounds, IQR 0.97-1.25; 1.20x in another 16); at 64x64 input
# (block 1 at 16x16 keeps XLA's) 1.06x; resnet20 (its 8x8 stage takes it) 1.00x; every conv of
# any size taking it: densenet121 at 64x64 1.06x, resnet20 0.99x.
COL2IM_MAX_PIXELS = 64  # output pixels per image
# Outside loops too, the kernel gradient of a stride-1 conv of a few input channels is faster as
# _plain_kernel_grad (sliced alike) than as XLA's own gradient conv over the same slices (both
# copy each slice transposed first; in net_dropout XLA's copies recompute the max pool and dropout,
# 0.5-0.8 ms apiece; why its form is slower was not pinned down). Per step, median of alternating
# rounds of 10 steps, a patched engine (12-24 rounds) then the switch (16): net_width
# (conv2 32->16 on 16x16) 1.12x / 1.09x, net_batchnorm 1.10x / 1.08x, net_dropout 1.09x / 1.10x,
# net (16->8) 1.03x / 1.03x, lenet (5x5 6->16) 1.03x, dilated (dilated convs: untouched) 1.02x;
# resnet20 (its unscanned 16- and 32-channel convs) 0.99x. DenseNet's 128->32 lose (0.90x), and
# so do the first convs of 3 channels (net with them: 0.75x), hence 4-32 channels.
PLAIN_KERNEL_GRAD_MAX_CHANNELS = 32
# oneDNN's convs (onednn_convs) take the convs of more input channels than this. Alone, forward
# and both gradients, oneDNN beat these forms for every net's convs but the dilated net's first
# (a tap sum: 0.9 against 2.2 ms); in LeNet's step, though, either of its convs through oneDNN
# (1->6 and 6->16, 5x5) made the step 2-3x slower (0.37x paired, `bench.py --nets lenet
# --without onednn_convs`): the fusion of the max pool's backward with the sigmoid's derivative
# that feeds the custom call takes 25.7 ms of a 37 ms step (3.1 ms in XLA's step; `jax.profiler`),
# so the convs of a few channels (the first convs, LeNet's) keep the forms above
# (docs/cpu_speedups.md#onednn_convs). On one device only: the custom calls carry no sharding
# rule, so under a data mesh of several devices XLA would gather each conv's operands onto all.
ONEDNN_MIN_CHANNELS = 8
# ... and at most this many: DenseNet-121's 3x3 128->32 convs, faster alone through oneDNN (forward
# + kernel gradient 40.5 -> 33.4 ms), gave its step no gain in four paired runs (0.89x, 0.97x,
# 0.99x, 1.06x; `bench.py --nets densenet121 --without onednn_convs`; an A/B of two identical
# programs measured 0.82x there), so they keep the forms above. The ResNets' steps, whose convs
# have 16-64, gain 1.3-1.6x.
ONEDNN_MAX_CHANNELS = 64


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
# cache, and independent slices run on both cores. Measured on a 2-core Xeon (1.25 MiB L2
# per core, jax 0.10.2), kernel gradient alone, whole batch -> best slicing: LeNet conv1 1->6 5x5
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
