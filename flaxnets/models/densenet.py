"""DenseNet-BC (densenet121_se_imagefolder.txt) in Flax NNX with torchvision's module names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxnets.layers import (AvgPool2d, BatchNorm2d, ImageClassifier, MaxPool2d, ReLU, SEBlock,
                             Sequential, conv2d, global_avg_pool, linear)

_KN = "kaiming_normal"


class DenseLayer(Sequential):
    """norm1-relu1-conv1(1×1)-norm2-relu2-conv2(3×3); the new features are concatenated."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 *, rngs: nnx.Rngs):
        super().__init__()
        self.add_module("norm1", BatchNorm2d(num_input_features))
        self.add_module("relu1", ReLU())
        self.add_module("conv1", conv2d(num_input_features, bn_size * growth_rate, 1, bias=False, init=_KN, rngs=rngs))
        self.add_module("norm2", BatchNorm2d(bn_size * growth_rate))
        self.add_module("relu2", ReLU())
        self.add_module("conv2", conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False, init=_KN, rngs=rngs))
        # the dropout is not one of the Sequential's layers (torch applies it functionally)
        self.dropout = nnx.Dropout(drop_rate, rngs=rngs) if drop_rate > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        t = super().__call__(x)
        if self.dropout is not None:
            t = self.dropout(t)
        return jnp.concatenate([x, t], axis=-1)


class DenseBlock(Sequential):
    """``num_layers`` DenseLayers named denselayer1…N."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, *, rngs: nnx.Rngs):
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, rngs=rngs)
            self.add_module(f"denselayer{i + 1}", layer)


class Transition(Sequential):
    """norm-relu-conv(1×1)-pool(2): compresses channels and halves resolution."""

    def __init__(self, num_input_feature: int, num_output_features: int, *, rngs: nnx.Rngs):
        super().__init__()
        self.add_module("norm", BatchNorm2d(num_input_feature))
        self.add_module("relu", ReLU())
        self.add_module("conv", conv2d(num_input_feature, num_output_features, 1, bias=False, init=_KN, rngs=rngs))
        self.add_module("pool", AvgPool2d(2, 2))


class DenseNet(ImageClassifier):
    """DenseNet-BC; with ``se_reduction`` set, the material's DenseNet+SE.

    Corrects the material: its ``forward`` discarded the SE output and pooled the raw features
    with a fixed 7×7 window (224×224 only); here the SE-weighted features are globally average
    pooled, so any input size works, and SE sees the final ``num_features`` channels.
    """

    def __init__(self, num_classes: int = 1000, growth_rate: int = 32,
                 block_config: tuple[int, ...] = (6, 12, 24, 16), num_init_features: int = 64,
                 bn_size: int = 4, compression_rate: float = 0.5, drop_rate: float = 0.0,
                 se_reduction: int | None = None, *, rngs: nnx.Rngs):
        self.features = Sequential()
        f = self.features
        f.add_module("conv0", conv2d(3, num_init_features, 7, 2, 3, bias=False, init=_KN, rngs=rngs))
        f.add_module("norm0", BatchNorm2d(num_init_features))
        f.add_module("relu0", ReLU())
        f.add_module("pool0", MaxPool2d(3, 2, 1))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            f.add_module(f"denseblock{i + 1}",
                         DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate, rngs=rngs))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(num_features * compression_rate)
                f.add_module(f"transition{i + 1}", Transition(num_features, out_features, rngs=rngs))
                num_features = out_features
        f.add_module("norm5", BatchNorm2d(num_features))
        f.add_module("relu5", ReLU())
        self.se = SEBlock(num_features, se_reduction, rngs=rngs) if se_reduction else None
        self.classifier = linear(num_features, num_classes, bias_init="zeros", rngs=rngs)

    def forward(self, x: jax.Array) -> jax.Array:
        features = self.features(x)
        if self.se is not None:
            features = self.se(features)
        return self.classifier(global_avg_pool(features))
