"""LeNet from the material (corr2d_and_lenet.txt): sigmoid activations, max pooling, 1×28×28 input."""

from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    """The note's LeNet; keys ``conv.0.weight`` … ``fc.4.bias``.

    Correction: the note's ``feature.view(img.shape[0], -1)`` fails on non-contiguous input
    (e.g. channels-last tensors); ``flatten`` computes the same thing and always works.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 6, 5),  # in_channels, out_channels, kernel_size
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),  # kernel_size, stride
            nn.Conv2d(6, 16, 5),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
        )
        self.fc = nn.Sequential(
            nn.Linear(16 * 4 * 4, 120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        feature = self.conv(img)
        return self.fc(torch.flatten(feature, 1))
