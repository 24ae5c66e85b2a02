"""LeNet on FashionMNIST trained as the tutorial trains it: the end-to-end benchmark's baseline.

The tutorial is the reference note ``corr2d_and_lenet.txt`` ("pytorch之卷积神经网络和leNet"),
sections 5.5.1-5.5.2, which follow Dive into Deep Learning's PyTorch edition (``d2lzh_pytorch``):
its ``LeNet``, ``train_ch5`` and ``evaluate_accuracy``, and ``d2lzh_pytorch.load_data_fashion_mnist``.
Written for this project with the same behaviour:

- the same module tree (``conv.{0,3}``, ``fc.{0,2,4}``; sigmoid activations, 2x2 max pools,
  the ``view`` flatten), unseeded, as the tutorial leaves it;
- torchvision's ``FashionMNIST`` through ``ToTensor``, ``DataLoader`` batch 256, the train set
  shuffled, 4 worker processes (none on Windows);
- Adam at 1e-3, cross-entropy, 5 epochs; after each epoch one line of loss, train and test
  accuracy and seconds, in the tutorial's format; the loss and the count of correct predictions
  read back to the host at every step, as the tutorial does.

Two differences, for the benchmark: the data root is the first argument and nothing is
downloaded (``download=False``), and the last line printed is ``{"test_acc": ...}`` (JSON), the
final epoch's test accuracy, which ``benchmarks.e2e`` reads.

    python -m benchmarks.tutorial_lenet ROOT    # ROOT/FashionMNIST/raw/ holds the IDX files
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

BATCH_SIZE = 256
LEARNING_RATE = 1e-3
EPOCHS = 5


class LeNet(nn.Module):
    """Two conv (5x5) / sigmoid / max-pool (2x2) stages, 1 -> 6 -> 16 channels, then a
    256-120-84-10 sigmoid MLP; inputs 1x28x28."""

    def __init__(self) -> None:
        super().__init__()
        stages = []
        for c_in, c_out in ((1, 6), (6, 16)):
            stages += [nn.Conv2d(c_in, c_out, kernel_size=5), nn.Sigmoid(),
                       nn.MaxPool2d(kernel_size=2, stride=2)]
        self.conv = nn.Sequential(*stages)
        head: list[nn.Module] = []
        widths = (16 * 4 * 4, 120, 84, 10)
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            head += [nn.Linear(n_in, n_out), nn.Sigmoid()]
        self.fc = nn.Sequential(*head[:-1])  # no activation after the logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.conv(images)
        return self.fc(maps.view(images.shape[0], -1))


def fashion_mnist_loaders(root: str, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled) and test loaders of torchvision's FashionMNIST under ``root``, images in [0, 1]."""
    to_tensor = torchvision.transforms.ToTensor()
    workers = 0 if sys.platform.startswith("win") else 4
    sets = [torchvision.datasets.FashionMNIST(root=root, train=train, download=False, transform=to_tensor)
            for train in (True, False)]
    return (DataLoader(sets[0], batch_size=batch_size, shuffle=True, num_workers=workers),
            DataLoader(sets[1], batch_size=batch_size, shuffle=False, num_workers=workers))


def accuracy(model: nn.Module, batches: Iterable, device: torch.device) -> float:
    """Share of correct top-1 predictions over ``batches``, in eval mode and without gradients."""
    correct, seen = 0.0, 0
    model.eval()
    with torch.no_grad():
        for images, labels in batches:
            hits = model(images.to(device)).argmax(dim=1) == labels.to(device)
            correct += hits.float().sum().cpu().item()
            seen += labels.shape[0]
    model.train()
    return correct / seen


def train(model: nn.Module, train_batches: DataLoader, test_batches: DataLoader,
          optimizer: torch.optim.Optimizer, device: torch.device, epochs: int) -> list[float]:
    """Train for ``epochs``, printing one line per epoch; the test accuracy after each epoch."""
    model.to(device)
    print("training on ", device)
    criterion = nn.CrossEntropyLoss()
    test_accs = []
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        loss_sum, correct, seen, steps = 0.0, 0.0, 0, 0
        for images, labels in train_batches:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = criterion(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.cpu().item()
            correct += (logits.argmax(dim=1) == labels).sum().cpu().item()
            seen += labels.shape[0]
            steps += 1
        test_accs.append(accuracy(model, test_batches, device))
        print("epoch %d, loss %.4f, train acc %.3f, test acc %.3f, time %.1f sec"
              % (epoch, loss_sum / steps, correct / seen, test_accs[-1], time.time() - t0))
    return test_accs


def main(argv: list[str]) -> int:
    """Train LeNet on the FashionMNIST under ``argv[0]`` and print the final test accuracy as JSON."""
    if len(argv) != 1:
        print("usage: python -m benchmarks.tutorial_lenet ROOT  (ROOT/FashionMNIST/raw/ holds the IDX files)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LeNet()
    print(model)
    train_batches, test_batches = fashion_mnist_loaders(argv[0], BATCH_SIZE)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    test_accs = train(model, train_batches, test_batches, optimizer, device, EPOCHS)
    print(json.dumps({"test_acc": test_accs[-1]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
