"""The one table of nets: name -> model file and class (same in flaxnets and torch_ref), input, facts.

Pure Python (no jax, no torch) so that both ``flaxnets`` and ``torch_ref`` can read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NetSpec:
    """One registry row. ``module``/``cls`` name the class in ``<package>.models.<module>``."""

    name: str
    module: str
    cls: str
    num_classes: int
    input_shape: tuple[int, int, int]  # H, W, C of the recipe's data
    params: int  # trainable parameters at the default class count (a fact the tests pin)
    head: str  # state_dict prefix of the classifier layer; its weight's rows = class count
    kwargs: dict[str, Any] = field(default_factory=dict)
    parity_input: tuple[int, int, int] | None = None  # smaller H, W, C for parity checks
    any_size: bool = False  # global pooling before the head: any H, W (>= 32) works
    batch_norm: bool = False  # has BatchNorm layers (batch statistics): drops a partial last batch
    # Hundreds of small ops of distinct shapes (DenseNet: a new channel count in every layer), so
    # eager JAX compiles one small program per op and shape. Parity checks run it jitted, as one
    # program; loaders build it abstract (``flaxnets.create_for_loading``), skipping random init.
    many_small_ops: bool = False

    @property
    def check_shape(self) -> tuple[int, int, int]:
        """Input shape (H, W, C) used by parity checks."""
        return self.parity_input or self.input_shape


_RESNET_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962, 1202: 19_421_274}
_DENSENET = {  # depth -> (block_config, params at 1000 classes)
    121: ((6, 12, 24, 16), 7_978_856),
    169: ((6, 12, 32, 32), 14_149_480),
    201: ((6, 12, 48, 32), 20_013_928),
}


def _rows() -> list[NetSpec]:
    fm, c2, c10 = (28, 28, 1), (32, 32, 3), (32, 32, 3)
    rows = [
        NetSpec("lenet", "lenet", "LeNet", 10, fm, 44_426, "fc.4"),
        NetSpec("dilated", "dilated", "MyConvDilaNet", 10, fm, 170_314, "classifier.4"),
        NetSpec("net", "cifar2", "Net", 2, c2, 18_090, "fc2"),
        NetSpec("net_width", "cifar2", "NetWidth", 2, c2, 38_386, "fc2"),
        NetSpec("net_dropout", "cifar2", "NetDropout", 2, c2, 38_386, "fc2"),
        NetSpec("net_batchnorm", "cifar2", "NetBatchNorm", 2, c2, 38_482, "fc2", batch_norm=True),
    ]
    for depth, params in _RESNET_PARAMS.items():
        rows.append(
            NetSpec(f"resnet{depth}", "resnet_cifar", "ResNet", 10, c10, params, "linear",
                    kwargs={"depth": depth}, batch_norm=True)
        )
    for depth, (blocks, params) in _DENSENET.items():
        rows.append(
            NetSpec(f"densenet{depth}", "densenet", "DenseNet", 1000, (224, 224, 3), params,
                    "classifier", kwargs={"block_config": blocks}, parity_input=(64, 64, 3),
                    any_size=True, batch_norm=True, many_small_ops=True)
        )
    rows.append(
        NetSpec("densenet121_se", "densenet", "DenseNet", 2, (224, 224, 3), 7_218_050, "classifier",
                kwargs={"block_config": _DENSENET[121][0], "se_reduction": 8},
                parity_input=(64, 64, 3), any_size=True, batch_norm=True, many_small_ops=True)
    )
    return rows


REGISTRY: dict[str, NetSpec] = {row.name: row for row in _rows()}


def list_nets() -> list[str]:
    """Names of every registered net, in table order."""
    return list(REGISTRY)


class UnknownNetError(KeyError):
    """Raised for a net name that is not in the registry; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def get_spec(name: str) -> NetSpec:
    """The registry row for ``name``; an unknown name raises and lists the valid names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownNetError(f"unknown net {name!r}; valid nets: {', '.join(REGISTRY)}") from None


def model_class(package: str, name: str) -> tuple[type, dict[str, Any], NetSpec]:
    """Import ``<package>.models.<module>.<cls>`` for ``name``; returns (class, kwargs, spec)."""
    spec = get_spec(name)
    mod = importlib.import_module(f"{package}.models.{spec.module}")
    return getattr(mod, spec.cls), dict(spec.kwargs), spec


def check_image_shape(name: str, shape: tuple[int, ...]) -> None:
    """Raise ValueError (one line, naming what the net accepts) if ``shape`` (H, W, C) does not fit."""
    spec = get_spec(name)
    h, w, c = spec.input_shape
    if len(shape) != 3:
        raise ValueError(f"net {name!r} takes (H, W, C) images, got shape {tuple(shape)}")
    if shape[2] != c:
        raise ValueError(f"net {name!r} takes {c}-channel images, the data has {shape[2]} channels")
    if spec.any_size:
        if min(shape[:2]) < 32:
            raise ValueError(f"net {name!r} needs images of at least 32x32 pixels, got "
                             f"{shape[0]}x{shape[1]}")
    elif tuple(shape[:2]) != (h, w):
        raise ValueError(f"net {name!r} takes {h}x{w} images, the data has {shape[0]}x{shape[1]} "
                         f"(resize the data or pick a net made for that size)")
