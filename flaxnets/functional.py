"""Plain array functions shared by the layers and their XLA:CPU forms (the normalisation math)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def batch_stats(x: Array) -> tuple[Array, Array]:
    """Per-channel mean and biased variance of an NHWC batch; the two-pass variance (as torch),
    not E[x²]-E[x]², which loses digits."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    return mean, jnp.mean(jnp.square(x - mean), axis=axes)


def normalised(x: Array, mean: Array, var: Array, scale: Array, bias: Array, eps: float) -> Array:
    """BatchNorm's affine normalisation of ``x`` with the given statistics."""
    return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias
