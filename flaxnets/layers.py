"""Flax NNX layers that mirror torch.nn modules: names, initialisers and numerics.

Every layer here exists so that a Flax module path equals the torch ``state_dict`` prefix of the
same layer and so that a freshly initialised Flax net draws from the torch distributions.
Inputs are NHWC float32 throughout. Where XLA:CPU runs another form of the same function faster,
the layer asks ``flaxnets.xla_cpu`` at one place and gets XLA's own form everywhere else.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen import avg_pool, max_pool

from flaxnets import xla_cpu
from flaxnets.functional import batch_stats, normalised
from flaxnets.registry import check_batch_shape

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


def unrolled_stacks() -> contextlib.AbstractContextManager[None]:
    """Within the block, every ``BlockStack`` runs its blocks one by one (no scan).

    For tools that need each block's output (``introspect.record_outputs``): inside a scan, a
    block's output is only a tracer of the loop body.
    """
    return xla_cpu.without("scanned_stages")


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
        conv_general_dilated=xla_cpu.conv_general_dilated,
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


def set_compute_dtype(model: nnx.Module, dtype: Any) -> nnx.Module:
    """Make ``model``'s convs and linear layers compute in ``dtype`` (bf16 mixed precision): their
    parameters keep their own dtype and are cast at use, so gradients and the optimiser stay
    fp32; ``BatchNorm2d`` normalises in fp32 whatever it is given. Returns ``model``."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (nnx.Conv, nnx.Linear)):
            module.dtype = dtype
    return model


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
        if jnp.finfo(x.dtype).bits < 32:  # mixed precision: statistics and normalisation in fp32
            return self(x.astype(jnp.float32)).astype(x.dtype)
        scale, bias = self.scale[...], self.bias[...]
        if self.use_running_average:
            return normalised(x, self.mean[...], self.var[...], scale, bias, self.eps)
        fast = xla_cpu.batch_norm_train(x, scale, bias, self.eps)
        if fast is not None:
            y, mean, var = fast
        else:
            mean, var = batch_stats(x)
            y = normalised(x, mean, var, scale, bias, self.eps)
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




# --------------------------------------------------------------------------- nets
class ImageClassifier(nnx.Module):
    """Base of the registered nets: ``__call__`` checks that the batch is one the net takes
    (NHWC, the registry's size and channels), then runs the subclass's ``forward``.

    The check reads only ``x.shape``, static under jit: it runs once per trace, not per step.
    """

    def __call__(self, x: Array) -> Array:
        check_batch_shape(type(self), x.shape)
        return self.forward(x)

    def forward(self, x: Array) -> Array:
        """The net's computation on a checked NHWC batch."""
        raise NotImplementedError


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
        if (not xla_cpu.speedup_on("scanned_stages") or len(tail) < max(self.scan_min, 2)
                or xla_cpu.unrolled_stage(len(tail))):
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

        with xla_cpu.loop_body():
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


def pool2d(x: Array, kind: str, kernel_size: int, stride: int | None = None, padding: int = 0) -> Array:
    """Max or average pooling of an NHWC map with torch's semantics (floor mode, -inf padding)."""
    stride = stride or kernel_size
    fast = xla_cpu.pool(x, kind, kernel_size, stride, padding)
    if fast is not None:
        return fast
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
