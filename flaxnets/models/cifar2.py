"""The bird-vs-airplane nets (cifar2_bird_vs_airplane_nets.txt) in Flax NNX, 32×32×3 input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxnets.layers import (BatchNorm2d, ImageClassifier, conv2d, dropout2d, flatten_nchw, linear,
                             max_pool2d)


class NetWidth(ImageClassifier):
    """conv1 (3→n) and conv2 (n→n/2), each tanh + maxpool 2, then fc1 (→32, tanh) and fc2.

    Corrects the material: its ``forward`` skipped ``conv2`` (re-applying tanh and pooling to
    block 1's output), so its ``view`` could not work; here block 2 applies ``conv2``, as in the
    book the note follows. Subclasses add dropout or BatchNorm at the hooks ``_block1/_block2``.
    """

    def __init__(self, num_classes: int = 2, n_channel: int = 32, *, rngs: nnx.Rngs):
        self.n_channel = n_channel
        self.conv1 = conv2d(3, n_channel, 3, padding=1, rngs=rngs)
        self.conv2 = conv2d(n_channel, n_channel // 2, 3, padding=1, rngs=rngs)
        self.fc1 = linear((n_channel // 2) * 8 * 8, 32, rngs=rngs)
        self.fc2 = linear(32, num_classes, rngs=rngs)

    def _block1(self, x: jax.Array) -> jax.Array:
        return max_pool2d(jnp.tanh(self.conv1(x)), 2)

    def _block2(self, x: jax.Array) -> jax.Array:
        return max_pool2d(jnp.tanh(self.conv2(x)), 2)

    def forward(self, x: jax.Array) -> jax.Array:
        out = flatten_nchw(self._block2(self._block1(x)))
        return self.fc2(jnp.tanh(self.fc1(out)))


class Net(NetWidth):
    """The material's ``Net``: conv 3→16→8 (18,090 parameters at 2 classes).

    Same graph as NetWidth with 16 channels; the note's ``view`` is a flatten here.
    """

    def __init__(self, num_classes: int = 2, *, rngs: nnx.Rngs):
        super().__init__(num_classes, n_channel=16, rngs=rngs)


class NetDropout(NetWidth):
    """NetWidth + Dropout2d(0.4) after each conv block.

    Corrects the material: it applied ``conv2_dropout`` twice and never ``conv1_dropout``
    (and skipped ``conv2``); here each block has its own dropout.
    """

    def __init__(self, num_classes: int = 2, n_channel: int = 32, *, rngs: nnx.Rngs):
        super().__init__(num_classes, n_channel, rngs=rngs)
        self.conv1_dropout = dropout2d(0.4, rngs=rngs)
        self.conv2_dropout = dropout2d(0.4, rngs=rngs)

    def _block1(self, x: jax.Array) -> jax.Array:
        return self.conv1_dropout(super()._block1(x))

    def _block2(self, x: jax.Array) -> jax.Array:
        return self.conv2_dropout(super()._block2(x))


class NetBatchNorm(NetWidth):
    """NetWidth + BatchNorm2d after each conv, before tanh (38,482 parameters)."""

    def __init__(self, num_classes: int = 2, n_channel: int = 32, *, rngs: nnx.Rngs):
        super().__init__(num_classes, n_channel, rngs=rngs)
        self.conv1_batchnorm = BatchNorm2d(n_channel)
        self.conv2_batchnorm = BatchNorm2d(n_channel // 2)

    def _block1(self, x: jax.Array) -> jax.Array:
        return max_pool2d(jnp.tanh(self.conv1_batchnorm(self.conv1(x))), 2)

    def _block2(self, x: jax.Array) -> jax.Array:
        return max_pool2d(jnp.tanh(self.conv2_batchnorm(self.conv2(x))), 2)
