"""DenseNet-BC from the material (densenet121_se_imagefolder.txt), torchvision's key names.

growth 32, bn_size 4, compression 0.5; ``se_reduction`` adds the note's squeeze-excitation
block on the final feature map (``densenet121_se``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class DenseLayer(nn.Sequential):
    """BN-ReLU-Conv1×1-BN-ReLU-Conv3×3, output concatenated to the input."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float):
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(num_input_features))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module("conv1", nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False))
        self.add_module("norm2", nn.BatchNorm2d(bn_size * growth_rate))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module("conv2", nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False))
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = super().forward(x)
        if self.drop_rate > 0:
            t = F.dropout(t, p=self.drop_rate, training=self.training)
        return torch.cat([x, t], 1)


class DenseBlock(nn.Sequential):
    """``num_layers`` DenseLayers named denselayer1…N."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int, drop_rate: float):
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1×1-AvgPool2: halves channels (compression) and resolution between blocks."""

    def __init__(self, num_input_feature: int, num_output_features: int):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(num_input_feature))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(num_input_feature, num_output_features, kernel_size=1, stride=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(2, stride=2))


class SEAttention(nn.Module):
    """The note's squeeze-excitation block (bias-free MLP, torch default init)."""

    def __init__(self, channel: int = 512, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class DenseNet(nn.Module):
    """DenseNet-BC; with ``se_reduction`` set, the note's DenseNet+SE.

    Corrections to the note: its ``forward`` computed ``self.se(features)`` and discarded it,
    then pooled the raw features with a fixed 7×7 window (224×224 input only). Here the
    SE-weighted features are pooled with a global average pool, so any input size works.
    The SE block sees the final ``num_features`` channels (1024 for DenseNet-121) instead of
    a hard-coded 1024. Without ``se_reduction`` this is torchvision's DenseNet, key for key.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression_rate: float = 0.5,
        drop_rate: float = 0.0,
        se_reduction: int | None = None,
    ):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                transition = Transition(num_features, int(num_features * compression_rate))
                self.features.add_module("transition%d" % (i + 1), transition)
                num_features = int(num_features * compression_rate)
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.features.add_module("relu5", nn.ReLU(inplace=True))
        self.se = SEAttention(channel=num_features, reduction=se_reduction) if se_reduction else None
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        if self.se is not None:
            features = self.se(features)
        out = F.adaptive_avg_pool2d(features, 1)
        out = torch.flatten(out, 1)
        return self.classifier(out)
