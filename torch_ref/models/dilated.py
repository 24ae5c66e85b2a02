"""The dilated CNN from the material (dilated_cnn_fashionmnist.txt), 1×28×28 input."""

from __future__ import annotations

import torch
from torch import nn


class MyConvDilaNet(nn.Module):
    """The note's MyConvDilaNet: two dilation-2 convs with ReLU + AvgPool, then an MLP 512→256→128.

    Correction: ``x.view(x.size(0), -1)`` is replaced by ``flatten`` (works on non-contiguous
    input, same values).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels=1, out_channels=16, kernel_size=3, stride=1, padding=1, dilation=2),
            nn.ReLU(),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(16, 32, 3, 1, 0, dilation=2),
            nn.ReLU(),
            nn.AvgPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv2(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)
