"""Move weights between a torch ``state_dict`` and a Flax NNX model, strictly, by module type.

Because the Flax modules carry torch's names, a Flax module at path ``layer1.0.bn1`` owns the
torch keys ``layer1.0.bn1.*``. What changes is only the leaf name and layout, decided by the
Flax module's type (``RULES``). Per-checkpoint key spellings (torchvision's old ``norm.1``)
are normalised in one place, ``KEY_ALIASES``. Flatten order needs no exception: the Flax nets
flatten in torch's NCHW order (``flaxnets.layers.flatten_nchw``).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

import flaxnets
from flaxnets.layers import BatchNorm2d, Conv2D


@dataclass(frozen=True)
class Leaf:
    """One torch tensor <-> one Flax variable: names and the axis permutation torch->flax."""

    torch_name: str
    flax_name: str
    perm: tuple[int, ...] | None = None  # np.transpose axes taking the torch array to Flax's

    def to_flax(self, a: np.ndarray) -> np.ndarray:
        return a if self.perm is None else np.transpose(a, self.perm)

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        return a if self.perm is None else np.transpose(a, np.argsort(self.perm))

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        return flax_shape if self.perm is None else tuple(flax_shape[i] for i in np.argsort(self.perm))


# Flax module type -> its leaves. Conv kernels are OIHW in torch, HWIO in Flax; linear kernels
# (out, in) vs (in, out); BatchNorm names differ; the from-scratch Conv2D is stored as is.
RULES: dict[type, tuple[Leaf, ...]] = {
    nnx.Conv: (Leaf("weight", "kernel", (2, 3, 1, 0)), Leaf("bias", "bias")),
    nnx.Linear: (Leaf("weight", "kernel", (1, 0)), Leaf("bias", "bias")),
    BatchNorm2d: (
        Leaf("weight", "scale"),
        Leaf("bias", "bias"),
        Leaf("running_mean", "mean"),
        Leaf("running_var", "var"),
        Leaf("num_batches_tracked", "num_batches_tracked"),
    ),
    Conv2D: (Leaf("weight", "weight"), Leaf("bias", "bias")),
}

# Key spellings found in published checkpoints -> ours. torchvision's DenseNet checkpoints
# from before 0.3 name DenseLayer children ``norm.1`` instead of ``norm1`` (same regex as
# torchvision's own loader).
KEY_ALIASES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"),
     r"\1\2"),
)

# torch stores num_batches_tracked as int64; the Flax model keeps it as int32.
_TORCH_INT = np.int64


class StateDictMismatchError(ValueError):
    """A state_dict does not fit the model. Lists every missing, unexpected and mis-shaped key."""

    def __init__(self, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]], what: str = "model"):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"state_dict does not match the {what}: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(mismatched)} shape-mismatched key(s)"]
        lines += [f"  missing:    {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  shape:      {k}: model expects {tuple(e)}, state_dict has {tuple(g)}"
                  for k, e, g in mismatched]
        super().__init__("\n".join(lines))

    def summary(self) -> str:
        """One line: the counts and the first problem of each kind."""
        first = [f"missing {self.missing[0]}" if self.missing else "",
                 f"unexpected {self.unexpected[0]}" if self.unexpected else "",
                 (f"{self.mismatched[0][0]} is {tuple(self.mismatched[0][2])}, expected "
                  f"{tuple(self.mismatched[0][1])}") if self.mismatched else ""]
        return f"{str(self).splitlines()[0]} (first: {'; '.join(f for f in first if f)})"


def check_state_dict(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Any],
                     what: str = "model") -> None:
    """Raise StateDictMismatchError unless ``state_dict`` has exactly the keys and shapes expected."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [(key, tuple(want), tuple(to_numpy(state_dict[key]).shape))
                  for key, want in expected.items()
                  if key in state_dict and tuple(to_numpy(state_dict[key]).shape) != tuple(want)]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched, what)


def normalize_keys(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Rename keys spelled the old way (``KEY_ALIASES``) to the names our modules use."""
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        for pattern, repl in KEY_ALIASES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _modules_in_definition_order(module: nnx.Module, path: tuple = ()
                                 ) -> Iterator[tuple[tuple, nnx.Module]]:
    """(path, module) in attribute-assignment order; nnx.iter_modules sorts names instead.

    The Flax models assign their layers in the torch definitions' order, so this yields the
    order of torch's own ``state_dict()`` (a key-by-key diff of exported files stays readable).
    """
    yield path, module
    for name, value in vars(module).items():
        if isinstance(value, nnx.Module):
            yield from _modules_in_definition_order(value, (*path, name))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, nnx.Module):
                    yield from _modules_in_definition_order(v, (*path, name, i))


def _entries(model: nnx.Module) -> Iterator[tuple[str, Leaf, nnx.Variable]]:
    """(torch key, rule leaf, Flax variable) for every tensor the model holds, in torch's order."""
    for path, module in _modules_in_definition_order(model):
        leaves = RULES.get(type(module))
        if leaves is None:
            continue
        prefix = ".".join(str(p) for p in path)
        for leaf in leaves:
            var = getattr(module, leaf.flax_name, None)
            if var is None:  # e.g. a conv built with bias=False
                continue
            yield (f"{prefix}.{leaf.torch_name}" if prefix else leaf.torch_name), leaf, var


def to_numpy(value: Any) -> np.ndarray:
    """One state_dict value as a numpy array: a torch tensor (any device; bfloat16 widened to
    float32, which numpy lacks) or anything ``np.asarray`` takes. Does not import torch."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], what: str = "model") -> nnx.Module:
    """Copy a torch-layout ``state_dict`` into ``model`` in place; strict, all-or-nothing.

    Every key must be present with the right shape and no key may be left over; otherwise
    ``StateDictMismatchError`` lists all problems and the model is left untouched.
    """
    state_dict = normalize_keys(state_dict)
    entries = list(_entries(model))
    # var.get_value() rather than var[...]: it also works on abstract (nnx.eval_shape) models,
    # which skips DenseNet's 20-s random initialisation when every value is replaced anyway
    check_state_dict({key: leaf.torch_shape(tuple(var.get_value().shape)) for key, leaf, var in entries},
                     state_dict, what)
    for key, leaf, var in entries:
        value = leaf.to_flax(to_numpy(state_dict[key]))
        # np.array copies: on CPU jnp.asarray may alias the buffer of a torch tensor's numpy
        # view, and the Flax weights would then change when torch updates BN stats in place.
        var.set_value(jnp.asarray(np.array(value, dtype=var.get_value().dtype)))
    return model


def torch_to_flax(name: str, state_dict: Mapping[str, Any], num_classes: int | None = None,
                  **kw: Any) -> nnx.Module:
    """Build the Flax net ``name`` holding the weights (and BN statistics) of ``state_dict``.

    The class count is read from the classifier weight unless given; ``kw`` goes to the
    constructor (e.g. ``option='B'``).
    """
    spec = flaxnets.get_spec(name)
    if not isinstance(state_dict, Mapping):
        got = type(state_dict).__name__
        if isinstance(getattr(state_dict, "state_dict", None), Mapping):  # parity.Weights
            got = f"{got} (its .state_dict is one)"
        elif callable(getattr(state_dict, "state_dict", None)):
            got = f"a torch module ({got})"
        elif isinstance(state_dict, (str, os.PathLike)):
            got = f"a path ({str(state_dict)!r})"
        raise TypeError(f"torch_to_flax takes a state_dict (a mapping of tensors), got {got}: pass "
                        f"module.state_dict(), or for a file w = parity.read_weights(path, {name!r}) "
                        f"and torch_to_flax({name!r}, w.state_dict)")
    state_dict = normalize_keys(state_dict)
    if num_classes is None:
        head = state_dict.get(f"{spec.head}.weight")
        num_classes = int(to_numpy(head).shape[0]) if head is not None else spec.num_classes
    model = flaxnets.create_for_loading(name, num_classes=num_classes, **kw)
    return load_state_dict(model, state_dict, what=f"Flax {name}")


def to_numpy_state_dict(model: nnx.Module) -> OrderedDict[str, np.ndarray]:
    """The model's tensors as numpy arrays in torch layout under torch key names."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, leaf, var in _entries(model):
        a = leaf.to_torch(np.asarray(var[...]))
        if np.issubdtype(a.dtype, np.integer):
            a = a.astype(_TORCH_INT)
        # a writable C-ordered copy (torch.from_numpy shares memory); np.ascontiguousarray
        # would turn num_batches_tracked's 0-d array into shape (1,)
        out[key] = np.array(a, order="C")
    return out


def flax_to_torch(model: nnx.Module) -> OrderedDict[str, Any]:
    """A torch ``state_dict`` (CPU tensors, num_batches_tracked included) of a Flax model.

    ``torch_ref.create(name).load_state_dict(flax_to_torch(model), strict=True)`` succeeds.
    """
    import torch

    return OrderedDict((k, torch.from_numpy(v)) for k, v in to_numpy_state_dict(model).items())
