"""flaxnets: classic image-classification CNNs in Flax NNX, mirroring their PyTorch definitions."""

from __future__ import annotations

from typing import Any

from flaxnets.registry import REGISTRY, NetSpec, UnknownNetError, get_spec, list_nets

__all__ = ["REGISTRY", "NetSpec", "UnknownNetError", "create", "create_for_loading", "get_spec", "list_nets"]


def create(name: str, num_classes: int | None = None, seed: int = 0, **kw: Any):
    """Build the Flax NNX model ``name`` with ``num_classes`` outputs (registry default if None).

    ``seed`` seeds the parameter and dropout streams; ``kw`` overrides constructor arguments
    (e.g. ``n_channel`` for the cifar2 nets, ``option='B'`` for ResNet shortcuts). A bad argument
    is one TypeError or ValueError naming it.
    """
    from flax import nnx

    from flaxnets.registry import check_int, constructor

    cls, kwargs = constructor("flaxnets", name, num_classes, kw, own=("rngs",))
    return cls(rngs=nnx.Rngs(check_int("seed", seed, -(2**63), 2**63 - 1)), **kwargs)


def create_for_loading(name: str, num_classes: int | None = None, **kw: Any):
    """A model of ``name`` whose every tensor a weights loader will overwrite.

    For nets with ``NetSpec.many_small_ops`` (the DenseNets) shapes only (``nnx.eval_shape``):
    their random initialisation is skipped (densenet121 converts in 3.2 s abstract against 5.0 s
    created; 2-core CPU, a fresh process). The others are created: tracing resnet1202 abstractly
    takes 115 s against 20 s to build it, and the small nets build in well under a second. Nets
    with dropout are created too: they carry RNG state that no weights file holds.
    """
    import jax
    from flax import nnx

    if not get_spec(name).many_small_ops:
        return create(name, num_classes=num_classes, **kw)
    abstract = nnx.eval_shape(lambda: create(name, num_classes=num_classes, **kw))
    if jax.tree.leaves(nnx.state(abstract, nnx.RngState)):
        return create(name, num_classes=num_classes, **kw)
    return abstract
