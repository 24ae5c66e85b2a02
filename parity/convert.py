"""Move weights between a torch ``state_dict`` and a Flax NNX model, strictly, by module type.

Because the Flax modules carry torch's names, a Flax module at path ``layer1.0.bn1`` owns the
torch keys ``layer1.0.bn1.*`` (``nnx.Sequential``'s ``layers.<i>`` is torch's ``<i>``). What
changes is only the leaf name and layout, decided by the Flax module's type (``RULES``): the
project's layers and the stock ``flax.nnx`` ones, so any NNX twin of a torch module converts.
Per-checkpoint key spellings (torchvision's old ``norm.1``) are normalised in one place,
``KEY_ALIASES``. Flatten order needs no exception: the Flax nets flatten in torch's NCHW order
(``flaxnets.layers.flatten_nchw``).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

import flaxnets
from flaxnets.layers import BatchNorm2d, Conv2D


def conv_perm(ndim: int) -> tuple[int, ...]:
    """Axes taking a torch conv weight (O, I, *spatial) to a Flax kernel (*spatial, I, O):
    (2, 1, 0) for Conv1d's OIW -> WIO, (2, 3, 1, 0) for Conv2d's OIHW -> HWIO."""
    return (*range(2, ndim), 1, 0)


@dataclass(frozen=True)
class Leaf:
    """One torch tensor <-> one Flax variable: names and the axis permutation torch->flax.

    ``perm`` is fixed, or a function of the array's rank (``conv_perm``). ``flax_name`` None:
    a torch-only scalar counter the Flax layer does not hold (see ``RULES``).
    """

    torch_name: str
    flax_name: str | None
    perm: tuple[int, ...] | Callable[[int], tuple[int, ...]] | None = None

    def _perm(self, ndim: int) -> tuple[int, ...] | None:
        return self.perm(ndim) if callable(self.perm) else self.perm

    def to_flax(self, a: np.ndarray) -> np.ndarray:
        perm = self._perm(a.ndim)
        return a if perm is None else np.transpose(a, perm)

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        perm = self._perm(a.ndim)
        return a if perm is None else np.transpose(a, np.argsort(perm))

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        perm = self._perm(len(flax_shape))
        return flax_shape if perm is None else tuple(flax_shape[i] for i in np.argsort(perm))


# Flax module type -> its leaves (a subclass takes its nearest listed base's rule). Conv kernels
# are O, I, *spatial in torch and *spatial, I, O in Flax (Conv1d and Conv2d alike); linear
# kernels (out, in) vs (in, out); norm layers' weight is Flax's scale; Embed's table is the same
# (num, dim) array; the from-scratch Conv2D is stored as is. A leaf the module holds as None
# (bias=False, use_scale/use_bias=False) has no torch key either, as in torch.
# num_batches_tracked: flaxnets' BatchNorm2d keeps torch's counter (int32 in Flax, int64 in
# torch). The stock nnx.BatchNorm has none: torch -> Flax the key is required (strict, like any
# key; shape ()) and its value dropped; Flax -> torch it is written as 0, so that
# load_state_dict(strict=True) works. Torch reads the counter only with momentum=None (a
# cumulative average), which nnx.BatchNorm cannot express anyway.
_NORM = (Leaf("weight", "scale"), Leaf("bias", "bias"))
RULES: dict[type, tuple[Leaf, ...]] = {
    nnx.Conv: (Leaf("weight", "kernel", conv_perm), Leaf("bias", "bias")),
    nnx.Linear: (Leaf("weight", "kernel", (1, 0)), Leaf("bias", "bias")),
    BatchNorm2d: (
        *_NORM,
        Leaf("running_mean", "mean"),
        Leaf("running_var", "var"),
        Leaf("num_batches_tracked", "num_batches_tracked"),
    ),
    nnx.BatchNorm: (
        *_NORM,
        Leaf("running_mean", "mean"),
        Leaf("running_var", "var"),
        Leaf("num_batches_tracked", None),
    ),
    nnx.LayerNorm: _NORM,
    nnx.GroupNorm: _NORM,
    nnx.Embed: (Leaf("weight", "embedding"),),
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


def _type_name(cls: type) -> str:
    return f"nnx.{cls.__name__}" if cls.__module__.startswith("flax.") else f"{cls.__module__}.{cls.__name__}"


class UnsupportedLayerError(TypeError):
    """The Flax model holds parameters or statistics that no rule of ``RULES`` covers."""

    def __init__(self, variables: list[str]):
        self.variables = variables
        known = ", ".join(sorted(_type_name(c) for c in RULES))
        super().__init__(f"no conversion rule for {len(variables)} Flax variable(s) (module types with "
                         f"a rule: {known}):\n" + "\n".join(f"  {v}" for v in variables))


def _children(module: nnx.Module) -> Iterator[tuple[str | int, nnx.Module]]:
    """(name, submodule) in attribute-assignment order; nnx.Sequential's ``layers.<i>`` as ``<i>``."""
    for name, value in vars(module).items():
        if isinstance(module, nnx.Sequential) and name == "layers":
            # nnx.Sequential nests its children in an nnx.List under `layers`; torch's are 0, 1, ...
            yield from ((i, v) for i, v in enumerate(value) if isinstance(v, nnx.Module))
        elif isinstance(value, nnx.Module):
            yield name, value
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, nnx.Module):
                    yield f"{name}.{i}", v


def _modules_in_definition_order(module: nnx.Module, path: tuple = ()
                                 ) -> Iterator[tuple[tuple, nnx.Module]]:
    """(path, module) in attribute-assignment order; nnx.iter_modules sorts names instead.

    The Flax models assign their layers in the torch definitions' order, so this yields the
    order of torch's own ``state_dict()`` (a key-by-key diff of exported files stays readable).
    """
    yield path, module
    for name, child in _children(module):
        yield from _modules_in_definition_order(child, (*path, name))


def module_paths(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """Every module of ``model`` (the root as "") under its torch module path, in definition order."""
    for path, module in _modules_in_definition_order(model):
        yield ".".join(str(p) for p in path), module


def rule(module: nnx.Module) -> tuple[Leaf, ...] | None:
    """The leaves of ``module``'s type (or of its nearest base with a rule), None without one."""
    return next((RULES[c] for c in type(module).__mro__ if c in RULES), None)


def _entries(model: nnx.Module) -> Iterator[tuple[str, Leaf, nnx.Variable | None]]:
    """(torch key, rule leaf, Flax variable or None for a torch-only leaf) for every tensor the
    model holds, in torch's order."""
    for prefix, module in module_paths(model):
        for leaf in rule(module) or ():
            key = f"{prefix}.{leaf.torch_name}" if prefix else leaf.torch_name
            if leaf.flax_name is None:
                yield key, leaf, None
                continue
            var = getattr(module, leaf.flax_name, None)
            if var is None:  # e.g. a conv built with bias=False
                continue
            yield key, leaf, var


def _convertible_entries(model: nnx.Module) -> list[tuple[str, Leaf, nnx.Variable | None]]:
    """``_entries``, after checking that they cover every parameter and BN statistic of the model
    (one a rule does not cover would silently stay behind: ``UnsupportedLayerError``)."""
    entries = list(_entries(model))
    covered = {id(var) for _, _, var in entries if var is not None}
    left = [f"{path + '.' if path else ''}{name} ({_type_name(type(module))})"
            for path, module in module_paths(model) for name, value in vars(module).items()
            if isinstance(value, (nnx.Param, nnx.BatchStat)) and id(value) not in covered]
    if left:
        raise UnsupportedLayerError(left)
    return entries


def torch_only_keys(model: nnx.Module) -> list[str]:
    """The torch keys the Flax model does not hold (nnx.BatchNorm's num_batches_tracked): read and
    dropped by ``load_state_dict``, written as 0 by ``flax_to_torch``."""
    return [key for key, _, var in _entries(model) if var is None]


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
    entries = _convertible_entries(model)
    # var.get_value() rather than var[...]: it also works on abstract (nnx.eval_shape) models,
    # which skips DenseNet's 20-s random initialisation when every value is replaced anyway
    check_state_dict({key: () if var is None else leaf.torch_shape(tuple(var.get_value().shape))
                      for key, leaf, var in entries}, state_dict, what)
    for key, leaf, var in entries:
        if var is None:  # a torch-only counter: checked above, dropped (see RULES)
            continue
        value = leaf.to_flax(to_numpy(state_dict[key]))
        # np.array copies: on CPU jnp.asarray may alias the buffer of a torch tensor's numpy
        # view, and the Flax weights would then change when torch updates BN stats in place.
        var.set_value(jnp.asarray(np.array(value, dtype=var.get_value().dtype)))
    return model


def torch_to_flax(model: str | nnx.Module, state_dict: Mapping[str, Any], num_classes: int | None = None,
                  **kw: Any) -> nnx.Module:
    """A Flax model holding the weights (and BN statistics) of ``state_dict``.

    ``model`` a registry name: that net is built, its class count read from the classifier
    weight unless given, ``kw`` passed to the constructor (e.g. ``option='B'``). ``model`` an
    ``nnx.Module`` whose attribute paths mirror the torch module's (stock ``flax.nnx`` layers or
    the project's, see ``RULES``): ``state_dict`` is loaded into it in place and it is returned.
    """
    if isinstance(model, nnx.Module):
        if num_classes is not None or kw:
            raise TypeError("torch_to_flax: num_classes and constructor arguments apply to a registry "
                            f"name, not to a model instance ({type(model).__name__})")
        _require_mapping(state_dict, "torch.load(path, weights_only=True) and torch_to_flax(model, w)")
        return load_state_dict(model, state_dict, what=f"Flax {type(model).__name__}")
    spec = flaxnets.get_spec(model)  # a bad name or type: its error lists the nets
    _require_mapping(state_dict,
                     f"parity.read_weights(path, {model!r}) and torch_to_flax({model!r}, w.state_dict)")
    state_dict = normalize_keys(state_dict)
    if num_classes is None:
        head = state_dict.get(f"{spec.head}.weight")
        num_classes = int(to_numpy(head).shape[0]) if head is not None else spec.num_classes
    fmodel = flaxnets.create_for_loading(model, num_classes=num_classes, **kw)
    return load_state_dict(fmodel, state_dict, what=f"Flax {model}")


def _require_mapping(state_dict: Any, file_hint: str) -> None:
    """A TypeError saying what to pass when ``state_dict`` is not a mapping; ``file_hint``: how to
    read a file for this call (``w = <file_hint>``)."""
    if isinstance(state_dict, Mapping):
        return
    got = type(state_dict).__name__
    if isinstance(getattr(state_dict, "state_dict", None), Mapping):  # parity.Weights
        got = f"{got} (its .state_dict is one)"
    elif callable(getattr(state_dict, "state_dict", None)):
        got = f"a torch module ({got})"
    elif isinstance(state_dict, (str, os.PathLike)):
        got = f"a path ({str(state_dict)!r})"
    raise TypeError(f"torch_to_flax takes a state_dict (a mapping of tensors), got {got}: pass "
                    f"module.state_dict(), or for a file w = {file_hint}")


def to_numpy_state_dict(model: nnx.Module) -> OrderedDict[str, np.ndarray]:
    """The model's tensors as numpy arrays in torch layout under torch key names."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, leaf, var in _convertible_entries(model):
        if var is None:  # a torch-only counter (nnx.BatchNorm's num_batches_tracked): 0, see RULES
            out[key] = np.zeros((), _TORCH_INT)
            continue
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
