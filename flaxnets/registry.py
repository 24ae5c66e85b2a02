"""The one table of nets: name -> model file and class (same in flaxnets and torch_ref), input, facts.

Pure Python (no jax, no torch) so that both ``flaxnets`` and ``torch_ref`` can read it.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
from collections.abc import Mapping
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
    any_size: bool = False  # global pooling before the head: any H, W (>= MIN_SIZE) works
    batch_norm: bool = False  # has BatchNorm layers (batch statistics): drops a partial last batch
    # Hundreds of small ops of distinct shapes (DenseNet: a new channel count in every layer), so
    # eager JAX compiles one small program per op and shape. Parity checks run it jitted, as one
    # program; loaders build it abstract (``flaxnets.create_for_loading``), skipping random init.
    many_small_ops: bool = False

    @property
    def check_shape(self) -> tuple[int, int, int]:
        """Input shape (H, W, C) used by parity checks."""
        return self.parity_input or self.input_shape


MIN_SIZE = 32  # the least height and width an ``any_size`` net takes

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
    if not isinstance(name, str):
        raise TypeError(f"net name must be a str, got {name!r} ({type(name).__name__}); "
                        f"valid nets: {', '.join(REGISTRY)}")
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownNetError(f"unknown net {name!r}; valid nets: {', '.join(REGISTRY)}") from None


def model_class(package: str, name: str) -> tuple[type, dict[str, Any], NetSpec]:
    """Import ``<package>.models.<module>.<cls>`` for ``name``; returns (class, kwargs, spec)."""
    spec = get_spec(name)
    mod = importlib.import_module(f"{package}.models.{spec.module}")
    return getattr(mod, spec.cls), dict(spec.kwargs), spec


def check_int(what: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int, else one TypeError or ValueError naming ``what`` and the value.

    bool is refused (``True`` is not a count); numpy integers are taken and returned as int.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{what} must be at most {maximum}, got {value}")
    return value


def constructor(package: str, name: str, num_classes: int | None = None,
                kw: Mapping[str, Any] | None = None, own: tuple[str, ...] = ()
                ) -> tuple[type, dict[str, Any]]:
    """The class of ``name`` in ``package`` and its checked keyword arguments: the registry's,
    overridden by ``kw``, and ``num_classes`` (the registry's if None; an int of at least 1).

    ``own`` names constructor arguments the caller sets itself (Flax's ``rngs``); an argument
    the class does not take is one TypeError naming the net and the arguments it takes.
    """
    cls, kwargs, spec = model_class(package, name)
    num_classes = spec.num_classes if num_classes is None else check_int("num_classes", num_classes, 1)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    valid = [p.name for p in params if p.name not in own
             and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in kw or {}:
        if key not in valid:
            raise TypeError(f"net {name!r} ({cls.__name__}) takes no argument {key!r}; "
                            f"its arguments: {', '.join(valid)}")
    return cls, {**kwargs, **(kw or {}), "num_classes": num_classes}


def check_image_shape(name: str, shape: tuple[int, ...]) -> None:
    """Raise ValueError (one line, naming what the net accepts) if ``shape`` (H, W, C) does not fit."""
    spec = get_spec(name)
    h, w, c = spec.input_shape
    if len(shape) != 3:
        raise ValueError(f"net {name!r} takes (H, W, C) images, got shape {tuple(shape)}")
    if shape[2] != c:
        raise ValueError(f"net {name!r} takes {c}-channel images, the data has {shape[2]} channels")
    if spec.any_size:
        if min(shape[:2]) < MIN_SIZE:
            raise ValueError(f"net {name!r} needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                             f"got {shape[0]}x{shape[1]}")
    elif tuple(shape[:2]) != (h, w):
        raise ValueError(f"net {name!r} takes {h}x{w} images, the data has {shape[0]}x{shape[1]} "
                         f"(resize the data or pick a net made for that size)")


def check_batch_shape(model_cls: type, shape: tuple[int, ...]) -> None:
    """Raise ValueError (one line) unless ``shape`` is an NHWC batch that the registered net
    class ``model_cls`` (or the registered class it derives from) takes; other classes pass.

    Every row of one class takes the same input, so the first row of the class decides.
    """
    spec = next((s for k in model_cls.__mro__ for s in REGISTRY.values()
                 if k.__name__ == s.cls and k.__module__.endswith(f".models.{s.module}")), None)
    if spec is None:
        return
    shape = tuple(shape)
    if len(shape) == 4:
        try:
            check_image_shape(spec.name, shape[1:])
            return
        except ValueError:
            pass
    h, w, c = spec.input_shape
    want = f"(N, H, W, {c}) with H, W >= {MIN_SIZE}" if spec.any_size else f"(N, {h}, {w}, {c})"
    hint = ""
    if len(shape) == 4 and shape[1] == c and shape[3] != c:
        hint = "; a torch-layout (NCHW) batch needs x.transpose(0, 2, 3, 1)"
    elif len(shape) == 3 and shape[-1] == c:
        hint = "; a single image needs a batch axis: x[None]"
    raise ValueError(f"{model_cls.__name__} expects an NHWC batch {want}, got {shape}{hint}")
