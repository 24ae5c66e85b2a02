"""Training recipes, one per net family, as the reference tutorials train them.

Plain Python (no framework import): both engines read them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from flaxnets.registry import get_spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Recipe:
    """How one net family is trained: data set, optimiser, schedule, input pipeline, splits."""

    dataset: str
    optimizer: str  # 'adam' | 'sgd'
    lr: float
    batch_size: int
    epochs: int
    momentum: float = 0.0
    weight_decay: float = 0.0  # decoupled from the loss, added to the gradient as torch's SGD does
    l2: float = 0.0  # loss += l2 * sum(w**2) over all parameters
    milestones: tuple[int, ...] = ()  # epochs at which lr *= lr_gamma
    lr_gamma: float = 0.1
    normalize: str = "unit"  # 'unit' ([0, 1]) | 'imagenet' (mean/std after [0, 1])
    augment: str = "none"  # 'none' | 'crop_flip' (random crop with 4-pixel zero pad + h-flip)
    val_fraction: float = 0.0  # held out of train for validation; the best-val weights are kept
    test_fraction: float = 0.0  # carved out of train when the dataset has no test set
    # 'fp32' | 'bf16': bf16 compute in the convs and linear layers, with fp32 master weights,
    # optimiser state and BatchNorm statistics (JAX: nnx dtype; torch: autocast)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")


_CIFAR2 = Recipe("cifar2", "sgd", 1e-2, 64, 100)
RECIPES: dict[str, Recipe] = {
    # corr2d_and_lenet: Adam 1e-3, batch 256, 5 epochs on FashionMNIST
    "lenet": Recipe("fashion_mnist", "adam", 1e-3, 256, 5),
    # dilated_cnn_fashionmnist: Adam 3e-4, batch 64, 25 epochs, 80/20 split, best-val weights
    "dilated": Recipe("fashion_mnist", "adam", 3e-4, 64, 25, val_fraction=0.2),
    # cifar2_bird_vs_airplane_nets: SGD 1e-2, batch 64, 100 epochs; the BatchNorm net adds L2
    "net": _CIFAR2,
    "net_batchnorm": dataclasses.replace(_CIFAR2, l2=1e-3),
    # resnet_cifar_and_confusion_matrix (the CIFAR ResNet reference recipe): SGD 0.1, momentum
    # 0.9, decay 1e-4, lr x0.1 at epochs 100 and 150 of 200, crop + flip
    "resnet": Recipe("cifar10", "sgd", 0.1, 128, 200, momentum=0.9, weight_decay=1e-4,
                     milestones=(100, 150), normalize="imagenet", augment="crop_flip"),
    # densenet121_se_imagefolder: Adam 1e-4, batch 32, 20 epochs on an image folder
    "densenet": Recipe("image_folder", "adam", 1e-4, 32, 20, normalize="imagenet",
                       test_fraction=0.2),
}


def recipe_family(name: str) -> str:
    """The RECIPES key of net ``name`` (resnet56 -> 'resnet', net_width -> 'net')."""
    get_spec(name)  # unknown names raise UnknownNetError
    if name.startswith("resnet"):
        return "resnet"
    if name.startswith("densenet"):
        return "densenet"
    if name in ("net", "net_width", "net_dropout"):
        return "net"
    return name


def recipe_for(name: str, **overrides: Any) -> Recipe:
    """The recipe of net ``name`` with ``overrides`` (None values are ignored) applied."""
    return dataclasses.replace(RECIPES[recipe_family(name)],
                               **{k: v for k, v in overrides.items() if v is not None})
