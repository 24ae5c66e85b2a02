"""BatchNorm's training-mode backward written out for XLA:CPU (``batch_norm_train``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxnets.functional import batch_stats, normalised
from flaxnets.xla_cpu.switch import speedup_on

Array = jax.Array


def batch_norm_train(x: Array, scale: Array, bias: Array, eps: float
                     ) -> tuple[Array, Array, Array] | None:
    """(normalised x, batch mean, biased batch variance) through the written-out backward, where
    it measured faster (the CPU, 32 or more channels); None where XLA's autodiff is kept."""
    if (jax.default_backend() != "cpu" or not speedup_on("batch_norm_grads")
            or x.shape[-1] < BATCH_NORM_GRAD_MIN_CHANNELS):
        return None
    return _batch_norm(x, scale, bias, eps)


# BatchNorm's training-mode backward written out: one pass of two reductions (the sums of g and
# g*x_hat) and one elementwise pass, where autodiff of the forward gives four reductions and
# three passes. Per step, median of alternating rounds: net_batchnorm 1.14-1.17x
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
    mean, var = batch_stats(x)
    return normalised(x, mean, var, scale, bias, eps), mean, var


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
