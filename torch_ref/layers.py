"""The material's from-scratch pieces in PyTorch: ``corr2d`` and the ``Conv2D`` layer (verbatim)."""

from __future__ import annotations

import torch
from torch import nn


def corr2d(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """2-D cross-correlation, exactly the note's double loop (kept as the reference)."""
    h, w = K.shape
    Y = torch.zeros((X.shape[0] - h + 1, X.shape[1] - w + 1))
    for i in range(Y.shape[0]):
        for j in range(Y.shape[1]):
            Y[i, j] = (X[i : i + h, j : j + w] * K).sum()
    return Y


class Conv2D(nn.Module):
    """The note's custom conv layer: a kernel ``weight`` and a scalar ``bias``, both N(0, 1)."""

    def __init__(self, kernel_size: tuple[int, int]):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(kernel_size))
        self.bias = nn.Parameter(torch.randn(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return corr2d(x, self.weight) + self.bias
