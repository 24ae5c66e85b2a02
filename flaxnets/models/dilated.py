"""The dilated CNN (dilated_cnn_fashionmnist.txt) in Flax NNX; mirrors ``MyConvDilaNet``."""

from __future__ import annotations

import jax
from flax import nnx

from flaxnets.layers import (AvgPool2d, ImageClassifier, ReLU, Sequential, conv2d, flatten_nchw,
                             linear)


class MyConvDilaNet(ImageClassifier):
    """Two dilation-2 3×3 convs (ReLU, AvgPool 2) and an MLP 512→256→128→classes.

    The material's ``view`` (fails on non-contiguous input) is a flatten in torch order here.
    """

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = Sequential(conv2d(1, 16, 3, 1, 1, dilation=2, rngs=rngs), ReLU(), AvgPool2d(2, 2))
        self.conv2 = Sequential(conv2d(16, 32, 3, 1, 0, dilation=2, rngs=rngs), ReLU(), AvgPool2d(2, 2))
        self.classifier = Sequential(
            linear(32 * 4 * 4, 256, rngs=rngs), ReLU(),
            linear(256, 128, rngs=rngs), ReLU(),
            linear(128, num_classes, rngs=rngs),
        )

    def forward(self, x: jax.Array) -> jax.Array:
        return self.classifier(flatten_nchw(self.conv2(self.conv1(x))))
