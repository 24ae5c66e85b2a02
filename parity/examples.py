"""A worked pair for docs/porting.md: a small torch CNN and its Flax NNX twin (stock nnx layers and
flaxnets' BatchNorm2d, which has torch's BatchNorm semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from flax import nnx

from flaxnets.layers import BatchNorm2d


class TorchNet(torch.nn.Module):
    """Conv-BN-ReLU, a strided conv, GroupNorm, global average pool, a linear classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.GroupNorm(4, 32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 3, H, W)
        return self.head(self.features(x).mean(dim=(2, 3)))


class FlaxNet(nnx.Module):
    """TorchNet in NNX: the same attribute names, so each Flax path is a torch state_dict prefix
    (``features.layers.0`` holds ``features.0.*``)."""

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.features = nnx.Sequential(
            nnx.Conv(3, 16, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs),
            BatchNorm2d(16),  # torch's running-statistics update; nnx.BatchNorm's differs
            nnx.relu,
            # padding written out: 'SAME' would pad (0, 1) at stride 2 where torch pads (1, 1)
            nnx.Conv(16, 32, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs),
            nnx.GroupNorm(32, num_groups=4, epsilon=1e-5, rngs=rngs),  # nnx's default epsilon is 1e-6
            nnx.relu)
        self.head = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (N, H, W, 3)
        return self.head(jnp.mean(self.features(x), axis=(1, 2)))
