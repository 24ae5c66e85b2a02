"""Shared Flax NNX blocks that mirror torch.nn modules: names, initialisers and numerics.

Every block here exists so that a Flax module path equals the torch ``state_dict`` prefix of the
same layer and so that a freshly initialised Flax net draws from the torch distributions.
Inputs are NHWC float32 throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import avg_pool, max_pool

Array = jax.Array
Initializer = Callable[..., Array]


# --------------------------------------------------------------------------- initialisers
def torch_uniform(fan_in: int) -> Initializer:
    """U(±1/sqrt(fan_in)): torch's default for Conv2d/Linear weights *and* biases.

    (kaiming_uniform_ with a=sqrt(5) reduces to exactly this bound.)
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def kaiming_normal(fan_in: int) -> Initializer:
    """torch.nn.init.kaiming_normal_ defaults: N(0, 2/fan_in), *untruncated*.

    jax's variance_scaling(2, 'fan_in', 'normal') is truncated at 2σ and has a different std,
    so it would not match torch's distribution.
    """
    std = math.sqrt(2.0 / fan_in)

    def init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
        return std * jax.random.normal(key, shape, dtype)

    return init


def _weight_init(kind: str, fan_in: int) -> Initializer:
    if kind == "torch":
        return torch_uniform(fan_in)
    if kind == "kaiming_normal":
        return kaiming_normal(fan_in)
    raise ValueError(f"unknown weight init {kind!r}; expected 'torch' or 'kaiming_normal'")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


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
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: Array) -> Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            # two-pass variance (as torch), not E[x²]-E[x]² which loses digits
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            n = x.size // x.shape[-1]
            m = self.momentum
            unbiased = var * (n / max(n - 1, 1))
            # set_value, not `v[...] = x`: under tracing flax 0.12's __setitem__ probes the
            # tracer's .sharding, whose error message walks the whole jaxpr -- quadratic in
            # depth (resnet1202's eval_shape did not finish in 10 minutes).
            self.mean.set_value((1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean))
            self.var.set_value((1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased))
            self.num_batches_tracked.set_value(self.num_batches_tracked[...] + 1)
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...]
        return (x - mean) * inv + self.bias[...]


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


class MaxPool2d(nnx.Module):
    """nn.MaxPool2d (padding is -inf, as torch)."""

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride or kernel_size, padding

    def __call__(self, x: Array) -> Array:
        p = self.padding
        return max_pool(x, (self.kernel_size,) * 2, (self.stride,) * 2, ((p, p), (p, p)))


class AvgPool2d(nnx.Module):
    """nn.AvgPool2d without padding (floor mode, as torch)."""

    def __init__(self, kernel_size: int, stride: int | None = None):
        self.kernel_size, self.stride = kernel_size, stride or kernel_size

    def __call__(self, x: Array) -> Array:
        return avg_pool(x, (self.kernel_size,) * 2, (self.stride,) * 2, "VALID")


def max_pool2d(x: Array, k: int) -> Array:
    """F.max_pool2d(x, k) on NHWC."""
    return max_pool(x, (k, k), (k, k), "VALID")


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
