"""CIFAR ResNet (resnet_cifar_and_confusion_matrix.txt) in Flax NNX; mirrors ``torch_ref`` ResNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxnets.layers import (BatchNorm2d, BlockStack, ImageClassifier, Sequential, conv2d,
                             global_avg_pool, linear)


# Scan a stage's identical blocks from 3 on. Measured on a 2-core Xeon (JaxEngine train
# steps, scanned vs unrolled engines interleaved in one process, bench.py --without
# scanned_stages, with the XLA:CPU conv forms): resnet20 (2 identical blocks a stage)
# 162 vs 184 img/s, compile 15.0 vs 13.8 s, so it unrolls; resnet32 (4) 119 vs 118 img/s,
# compile 17.1 vs 23.4 s; resnet56 (8) 49 vs 48, 17.6 vs 33.2 s. resnet110 compiles in 16 vs
# 27 s; resnet1202 in 108 s (unrolled: not within 16.5 min, 11.6 GB).
SCAN_MIN_BLOCKS = 3


class ShortcutA(nnx.Module):
    """Option-A shortcut: stride-2 subsample and zero-pad channels by planes//4 on each side."""

    def __init__(self, planes: int):
        self.pad = planes // 4

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (self.pad, self.pad)))


class BasicBlock(nnx.Module):
    """conv3×3-BN-ReLU-conv3×3-BN + shortcut, ReLU. Option B shortcut = ``shortcut.0/1`` conv+BN."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A", *, rngs: nnx.Rngs):
        kn = "kaiming_normal"
        self.conv1 = conv2d(in_planes, planes, 3, stride, 1, bias=False, init=kn, rngs=rngs)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = conv2d(planes, planes, 3, 1, 1, bias=False, init=kn, rngs=rngs)
        self.bn2 = BatchNorm2d(planes)
        self.shortcut: nnx.Module = Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = ShortcutA(planes)
            elif option == "B":
                self.shortcut = Sequential(
                    conv2d(in_planes, self.expansion * planes, 1, stride, bias=False, init=kn, rngs=rngs),
                    BatchNorm2d(self.expansion * planes),
                )
            else:
                raise ValueError(f"shortcut option must be 'A' or 'B', got {option!r}")

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return jax.nn.relu(out + self.shortcut(x))


class ResNet(ImageClassifier):
    """ResNet-``depth`` (6n+2) for 32×32 inputs: 16-32-64 channels, n BasicBlocks per stage.

    Conv and linear weights are kaiming-normal (the material's ``_weights_init``); the linear
    bias keeps torch's default U(±1/√64).
    """

    def __init__(self, num_classes: int = 10, depth: int = 20, option: str = "A", *, rngs: nnx.Rngs):
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = conv2d(3, 16, 3, 1, 1, bias=False, init="kaiming_normal", rngs=rngs)
        self.bn1 = BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1, option, rngs)
        self.layer2 = self._make_layer(32, n, 2, option, rngs)
        self.layer3 = self._make_layer(64, n, 2, option, rngs)
        self.linear = linear(64, num_classes, init="kaiming_normal", rngs=rngs)

    def _make_layer(self, planes: int, num_blocks: int, stride: int, option: str, rngs: nnx.Rngs) -> BlockStack:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, option, rngs=rngs))
            self.in_planes = planes * BasicBlock.expansion
        # blocks 1.. of a stage are identical: scanned once there are SCAN_MIN_BLOCKS of them
        return BlockStack(*layers, scan_from=1, scan_min=SCAN_MIN_BLOCKS)

    def forward(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(global_avg_pool(out))
