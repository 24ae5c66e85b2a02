"""The bird-vs-airplane nets from the material (cifar2_bird_vs_airplane_nets.txt), 3×32×32 input.

Tanh activations and 2×2 max pooling as in the note; ``n_channel`` is the note's width argument.
The four classes share one ``forward`` through the ``_block1``/``_block2`` hooks; their
attribute names, and so their ``state_dict`` keys, are the note's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NetWidth(nn.Module):
    """The note's ``NetWidth`` (38,386 parameters at n_channel=32).

    Corrections: the note's ``forward`` never calls ``conv2`` (it re-applies tanh and pooling to
    block 1's output), so its ``view`` cannot work; block 2 applies ``conv2`` as in the book the
    note follows. ``view`` (fails on non-contiguous input) is replaced by ``flatten``.
    """

    def __init__(self, num_classes: int = 2, n_channel: int = 32):
        super().__init__()
        self.n_channel = n_channel
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=n_channel, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(in_channels=n_channel, out_channels=n_channel // 2, kernel_size=3, padding=1)
        self.fc1 = nn.Linear((n_channel // 2) * 8 * 8, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def _block1(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(torch.tanh(self.conv1(x)), 2)

    def _block2(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(torch.tanh(self.conv2(x)), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self._block2(self._block1(x)), 1)
        out = torch.tanh(self.fc1(out))
        return self.fc2(out)


class Net(NetWidth):
    """The note's ``Net``: conv 3→16→8, fc 512→32→2 (18,090 parameters).

    Correction: ``out.view(-1, 8*8*8)`` fails on non-contiguous input; ``flatten`` does not.
    """

    def __init__(self, num_classes: int = 2):
        super().__init__(num_classes, n_channel=16)


class NetDropout(NetWidth):
    """The note's ``NetDropout``: NetWidth with Dropout2d(p=0.4) after each conv block.

    Corrections: ``conv2`` is applied (the note skips it, as in NetWidth), and each block has its
    own dropout (the note applies ``conv2_dropout`` twice and never ``conv1_dropout``).
    """

    def __init__(self, num_classes: int = 2, n_channel: int = 32):
        super().__init__(num_classes, n_channel)
        self.conv1_dropout = nn.Dropout2d(p=0.4)
        self.conv2_dropout = nn.Dropout2d(p=0.4)

    def _block1(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1_dropout(super()._block1(x))

    def _block2(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2_dropout(super()._block2(x))


class NetBatchNorm(NetWidth):
    """The note's ``NetBatchNorm``: BatchNorm2d after each conv, before tanh (38,482 parameters)."""

    def __init__(self, num_classes: int = 2, n_channel: int = 32):
        super().__init__(num_classes, n_channel)
        self.conv1_batchnorm = nn.BatchNorm2d(num_features=n_channel)
        self.conv2_batchnorm = nn.BatchNorm2d(num_features=n_channel // 2)

    def _block1(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(torch.tanh(self.conv1_batchnorm(self.conv1(x))), 2)

    def _block2(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(torch.tanh(self.conv2_batchnorm(self.conv2(x))), 2)
