"""flaxnets: classic image-classification CNNs in Flax NNX, mirroring their PyTorch definitions."""

from __future__ import annotations

from typing import Any

from flaxnets.registry import REGISTRY, NetSpec, UnknownNetError, get_spec, list_nets

__all__ = ["REGISTRY", "NetSpec", "UnknownNetError", "create", "get_spec", "list_nets"]


def create(name: str, num_classes: int | None = None, seed: int = 0, **kw: Any):
    """Build the Flax NNX model ``name`` with ``num_classes`` outputs (registry default if None).

    ``seed`` seeds the parameter and dropout streams; ``kw`` overrides constructor arguments
    (e.g. ``n_channel`` for the cifar2 nets, ``option='B'`` for ResNet shortcuts).
    """
    from flax import nnx

    from flaxnets.registry import model_class

    cls, kwargs, spec = model_class("flaxnets", name)
    kwargs.update(kw)
    return cls(num_classes=spec.num_classes if num_classes is None else num_classes,
               rngs=nnx.Rngs(seed), **kwargs)
