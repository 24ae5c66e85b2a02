"""LeNet (corr2d_and_lenet.txt) in Flax NNX; mirrors ``torch_ref.models.lenet.LeNet``."""

from __future__ import annotations

import jax
from flax import nnx

from flaxnets.layers import (ImageClassifier, MaxPool2d, Sequential, Sigmoid, conv2d, flatten_nchw,
                             linear)


class LeNet(ImageClassifier):
    """Conv 1→6 k5, sigmoid, maxpool 2; conv 6→16 k5, sigmoid, maxpool 2; MLP 256→120→84→classes.

    Paths ``conv.0`` … ``fc.4`` equal the torch keys. The material's ``view`` (fails on
    non-contiguous input) is a flatten in torch order here.
    """

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv = Sequential(
            conv2d(1, 6, 5, rngs=rngs), Sigmoid(), MaxPool2d(2, 2),
            conv2d(6, 16, 5, rngs=rngs), Sigmoid(), MaxPool2d(2, 2),
        )
        self.fc = Sequential(
            linear(16 * 4 * 4, 120, rngs=rngs), Sigmoid(),
            linear(120, 84, rngs=rngs), Sigmoid(),
            linear(84, num_classes, rngs=rngs),
        )

    def forward(self, img: jax.Array) -> jax.Array:
        return self.fc(flatten_nchw(self.conv(img)))
