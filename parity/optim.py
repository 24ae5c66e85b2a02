"""Optimizer state between optax and ``torch.optim``, for every recipe of ``flaxnets.recipes``.

The optax side is ``flaxnets.engine.make_optimizer(recipe, steps)[0].init(params)``, the torch
side ``torch_ref.engine.make_optimizer(recipe, model.parameters()).state_dict()``:

- Adam: ``ScaleByAdamState(count, mu, nu)`` <-> per parameter ``step``, ``exp_avg``,
  ``exp_avg_sq`` (one count in optax, one per parameter in torch: they must agree);
- SGD with momentum (and weight decay, ``chain(add_decayed_weights, sgd(trace))``):
  ``TraceState(trace)`` <-> ``momentum_buffer``; SGD without momentum keeps nothing per parameter;
- the schedule position: ``ScaleByScheduleState.count`` (the optimizer steps taken) <-> torch's
  ``param_groups[0]['lr']`` and, for Adam, ``step``. torch's SGD keeps no step count, so its
  position comes from the caller (``step=``, e.g. epochs done × steps per epoch).

torch indexes parameters by their position in ``model.parameters()``, which is
``named_parameters()`` order; ``param_names`` gives those names from the Flax model. Moments
change names and layouts exactly as the weights do, so they go through ``parity.convert``: a
moment tree is written into a clone of the model and read back as a torch ``state_dict``, and the
way back loads a ``state_dict`` into a clone. Before its first step torch holds no per-parameter
state; optax holds zeros, which is the same thing (torch's first momentum buffer is the gradient,
optax's trace 0.9·0 + gradient).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import flaxnets
import torch_ref
from flaxnets.engine import make_optimizer, to_host
from flaxnets.recipes import Recipe
from parity.convert import _entries, load_state_dict, to_numpy, to_numpy_state_dict
from torch_ref.engine import make_optimizer as make_torch_optimizer

# per-parameter state keys torch's optimizers keep, by (optimizer, has momentum)
TORCH_SLOTS = {"adam": ("step", "exp_avg", "exp_avg_sq"), "sgd_momentum": ("momentum_buffer",), "sgd": ()}
# param-group settings that do not change the arithmetic (implementation choices) or that the
# conversion sets itself
_GROUP_FREE = ("lr", "params", "foreach", "fused", "capturable", "differentiable", "initial_lr",
               "param_names")


class OptimizerStateError(ValueError):
    """An optimizer state that does not fit the model or the recipe; the message is one line."""


def _kind(recipe: Recipe) -> str:
    if recipe.optimizer == "adam":
        return "adam"
    if recipe.optimizer == "sgd":
        return "sgd_momentum" if recipe.momentum else "sgd"
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def param_names(model: nnx.Module) -> list[str]:
    """The torch names of ``model``'s parameters in torch's ``model.parameters()`` order.

    Taken from the torch twin (built on the meta device: no memory, no initialisation) of the
    registry net whose parameter names ``model`` has: a model that went through ``nnx.clone``,
    ``nnx.merge`` or ``nnx.eval_shape`` holds its attributes in sorted order, not torch's. For a
    model of no registry net, its attribute order, which is torch's for the Flax twins as built.
    """
    names = [key for key, _, var in _entries(model) if isinstance(var, nnx.Param)]
    cls = type(model)
    return list(_torch_order(cls.__module__.rsplit(".", 1)[-1], cls.__name__, frozenset(names)) or names)


@functools.lru_cache(maxsize=64)
def _torch_order(module: str, cls: str, names: frozenset[str]) -> tuple[str, ...] | None:
    """torch's parameter order of the registry net of class ``module.cls`` named ``names``."""
    for net in flaxnets.list_nets():
        spec = flaxnets.get_spec(net)
        if (spec.module, spec.cls) != (module, cls):
            continue
        with torch.device("meta"):
            order = tuple(n for n, _ in torch_ref.create(net).named_parameters())
        if frozenset(order) == names:
            return order
    return None


def torch_param_groups(recipe: Recipe, n_params: int, lr: float) -> list[dict[str, Any]]:
    """The ``param_groups`` of the recipe's torch optimizer over ``n_params`` parameters at ``lr``
    (torch's own defaults for every other setting: built by torch itself)."""
    dummies = [torch.zeros(1, requires_grad=True) for _ in range(n_params)]
    groups = make_torch_optimizer(recipe, dummies).state_dict()["param_groups"]
    return [dict(g, lr=lr) for g in groups]


def _parts(opt_state: Any) -> dict[type, Any]:
    """The optax state's parts this module maps, by type (chains are plain tuples)."""
    found: dict[type, Any] = {}

    def walk(s: Any) -> None:
        if isinstance(s, (optax.ScaleByAdamState, optax.TraceState, optax.ScaleByScheduleState)):
            found[type(s)] = s
        elif isinstance(s, tuple) and not hasattr(s, "_fields"):
            for x in s:
                walk(x)

    walk(opt_state)
    return found


def _replace(opt_state: Any, new: dict[type, Any]) -> Any:
    """``opt_state`` with its parts of the types in ``new`` replaced."""
    if type(opt_state) in new:
        return new[type(opt_state)]
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields"):
        return tuple(_replace(x, new) for x in opt_state)
    return opt_state


def _to_torch_layout(model: nnx.Module, tree: Any, names: list[str]) -> dict[str, np.ndarray]:
    """A parameter-shaped tree (an optax moment) under torch names, in torch layouts."""
    clone = nnx.clone(model)
    nnx.update(clone, jax.tree.map(to_host, tree))
    sd = to_numpy_state_dict(clone)
    return {n: sd[n] for n in names}


def _from_torch_layout(model: nnx.Module, tensors: Mapping[str, np.ndarray], template: Any) -> Any:
    """torch-layout tensors by parameter name as a tree shaped and typed as ``template`` (a moment
    of ``make_optimizer(...).init(params)``); parameters without a tensor get zeros."""
    clone = nnx.clone(model)
    sd = to_numpy_state_dict(clone)
    for name in param_names(clone):
        sd[name] = tensors[name] if name in tensors else np.zeros_like(sd[name])
    load_state_dict(clone, sd, what="model's parameters")
    params = nnx.split(clone, nnx.Param, ...)[1]
    leaves = jax.tree.leaves(params)
    want = jax.tree.leaves(template)
    if len(leaves) != len(want):
        raise OptimizerStateError(f"the model has {len(leaves)} parameters, the optax state {len(want)}")
    return jax.tree.unflatten(jax.tree.structure(template),
                              [jnp.asarray(np.asarray(a), dtype=t.dtype) for a, t in zip(leaves, want)])


def _scalar(a: Any) -> int:
    return int(np.asarray(to_host(a)))


def _names(model: nnx.Module, param_order: list[str] | None) -> list[str]:
    names = param_names(model)
    if param_order is None:
        return names
    if sorted(param_order) != sorted(names):
        odd = sorted(set(param_order) ^ set(names))
        raise OptimizerStateError(f"param_order does not name the model's {len(names)} parameters "
                                  f"(it has {len(param_order)}; first difference {odd[:1]})")
    return list(param_order)


def optimizer_state_to_torch(opt_state: Any, model: nnx.Module, recipe: Recipe, lr: float, *,
                             param_order: list[str] | None = None) -> dict:
    """The torch optimizer ``state_dict`` equal to the optax ``opt_state`` of ``model``.

    ``torch_ref.engine.make_optimizer(recipe, tmodel.parameters()).load_state_dict(...)`` takes
    it for the torch twin ``tmodel`` of ``model`` (which gives the parameter names and order
    only); ``lr`` goes into ``param_groups`` (torch keeps the schedule's value there).
    ``param_order`` (torch's ``[n for n, _ in tmodel.named_parameters()]``) is needed only for
    a model of no registry net that went through ``nnx.clone``/``merge``/``eval_shape``, whose
    attributes are in sorted order rather than torch's (``param_names``).
    """
    kind = _kind(recipe)
    parts = _parts(opt_state)
    names = _names(model, param_order)
    need = {"adam": optax.ScaleByAdamState, "sgd_momentum": optax.TraceState}.get(kind)
    for t in (optax.ScaleByScheduleState, need):
        if t is not None and t not in parts:
            raise OptimizerStateError(f"the optax state has no {t.__name__}: it is not the state of "
                                      f"the recipe's {recipe.optimizer} optimizer")
    state: dict[int, dict[str, torch.Tensor]] = {}
    if kind == "adam":
        adam = parts[optax.ScaleByAdamState]
        step = _scalar(adam.count)
        if step:  # torch holds no state before the first step
            mu, nu = (_to_torch_layout(model, t, names) for t in (adam.mu, adam.nu))
            scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state = {i: {"step": torch.tensor(float(step), dtype=scalar),
                         "exp_avg": torch.from_numpy(mu[n]), "exp_avg_sq": torch.from_numpy(nu[n])}
                     for i, n in enumerate(names)}
    elif kind == "sgd_momentum" and _scalar(parts[optax.ScaleByScheduleState].count):
        trace = _to_torch_layout(model, parts[optax.TraceState].trace, names)
        state = {i: {"momentum_buffer": torch.from_numpy(trace[n])} for i, n in enumerate(names)}
    return {"state": state, "param_groups": torch_param_groups(recipe, len(names), lr)}


def _group_kind(group: Mapping[str, Any]) -> str:
    if "betas" in group:
        return "adam"
    if "momentum" in group:
        return "sgd_momentum" if group["momentum"] else "sgd"
    return "an unknown optimizer"


_KIND_NAMES = {"adam": "Adam", "sgd_momentum": "SGD with momentum", "sgd": "SGD without momentum"}


def check_torch_optimizer_state(torch_opt_sd: Any, names: list[str], shapes: Mapping[str, tuple[int, ...]],
                                recipe: Recipe) -> None:
    """Raise OptimizerStateError (one line) unless ``torch_opt_sd`` is a state of the recipe's
    torch optimizer over parameters ``names`` of torch ``shapes``: the optimizer's kind and
    settings, the parameter count, each tensor's shape, one step count."""
    if not isinstance(torch_opt_sd, Mapping) or not {"state", "param_groups"} <= set(torch_opt_sd):
        raise OptimizerStateError("not a torch optimizer state_dict (no 'state' and 'param_groups')")
    groups, per = torch_opt_sd["param_groups"], torch_opt_sd["state"]
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], Mapping):
        n = len(groups) if isinstance(groups, list) else "no list of"
        raise OptimizerStateError(f"the optimizer state has {n} parameter groups; the recipe's "
                                  f"optimizer has one")
    group, kind = groups[0], _kind(recipe)
    got = _group_kind(group)
    if got != kind:
        raise OptimizerStateError(f"the optimizer state comes from {_KIND_NAMES.get(got, got)}; the "
                                  f"recipe trains with {_KIND_NAMES[kind]} (lr {recipe.lr:g}"
                                  f"{f', momentum {recipe.momentum:g}' if recipe.momentum else ''})")
    want = torch_param_groups(recipe, len(names), recipe.lr)[0]
    differ = [f"{k} {group[k]!r} (the recipe's: {want[k]!r})" for k in want
              if k not in _GROUP_FREE and k in group and _plain(group[k]) != _plain(want[k])]
    if differ:
        raise OptimizerStateError(f"the optimizer's settings differ from the recipe's: {', '.join(differ)}")
    params = list(group.get("params", []))
    if len(params) != len(names):
        raise OptimizerStateError(f"the optimizer state holds {len(params)} parameters, the net has "
                                  f"{len(names)}")
    if not isinstance(per, Mapping):
        raise OptimizerStateError("the optimizer state's 'state' is not a mapping")
    index = {p: i for i, p in enumerate(params)}
    slots = TORCH_SLOTS[kind]
    for key, entry in per.items():
        if key not in index or not isinstance(entry, Mapping):
            raise OptimizerStateError(f"the optimizer state has an entry {key!r} for no parameter "
                                      f"(its parameters are {params[0]!r}..{params[-1]!r})")
        name = names[index[key]]
        extra = sorted(k for k, v in entry.items() if k not in slots and v is not None)
        if extra:
            raise OptimizerStateError(f"the optimizer state of {name} holds {', '.join(map(str, extra))}; "
                                      f"{_KIND_NAMES[kind]} keeps {', '.join(slots) or 'nothing'}")
        for slot in slots:
            if slot != "step" and entry.get(slot) is not None:
                shape = tuple(to_numpy(entry[slot]).shape)
                if shape != tuple(shapes[name]):
                    raise OptimizerStateError(f"the optimizer's {slot} of {name} (parameter {index[key]}) "
                                              f"has shape {shape}, the parameter {tuple(shapes[name])}")
        if kind == "adam" and not all(entry.get(s) is not None for s in slots):
            raise OptimizerStateError(f"the optimizer state of {name} lacks "
                                      f"{', '.join(s for s in slots if entry.get(s) is None)}")
    if kind == "adam":
        steps = {float(to_numpy(e["step"])) for e in per.values()}
        if len(steps) > 1 or (per and len(per) != len(names)):
            raise OptimizerStateError(f"the parameters' Adam step counts differ ({len(per)} of "
                                      f"{len(names)} have state, steps {sorted(steps)[:3]}); optax "
                                      f"keeps one count")
        if steps and not (next(iter(steps)).is_integer() and next(iter(steps)) >= 0):
            raise OptimizerStateError(f"the Adam step count {next(iter(steps))} is not a step count")


def torch_step_count(torch_opt_sd: Mapping[str, Any]) -> int | None:
    """The optimizer steps a torch state has taken by its own count: Adam's ``step`` (0 before
    the first step), None for SGD, which counts nothing. For a state that
    ``check_torch_optimizer_state`` passed."""
    group = torch_opt_sd["param_groups"][0]
    if _group_kind(group) != "adam":
        return None
    per = list(torch_opt_sd["state"].values())
    return int(float(to_numpy(per[0]["step"]))) if per else 0


def _plain(v: Any) -> Any:
    """A setting comparable across torch versions (betas may come back as a list)."""
    return list(v) if isinstance(v, (tuple, list)) else v


def optimizer_state_from_torch(torch_opt_sd: dict, model: nnx.Module, recipe: Recipe,
                               steps_per_epoch: int, *, step: int | None = None,
                               param_order: list[str] | None = None) -> Any:
    """The optax state (as ``flaxnets.engine.make_optimizer(recipe, steps_per_epoch)[0].init``
    makes it, same tree and dtypes) equal to the torch optimizer ``state_dict`` ``torch_opt_sd``.

    The schedule's position is ``step`` (optimizer steps taken) when given, else Adam's step
    count; SGD keeps none, so for SGD ``step`` is required. Raises OptimizerStateError when the
    state does not fit the model or the recipe. ``param_order``: see ``optimizer_state_to_torch``.
    """
    names = _names(model, param_order)
    ref = to_numpy_state_dict(model)
    check_torch_optimizer_state(torch_opt_sd, names, {n: ref[n].shape for n in names}, recipe)
    kind = _kind(recipe)
    params = nnx.split(model, nnx.Param, ...)[1]
    template = make_optimizer(recipe, steps_per_epoch)[0].init(params)
    parts = _parts(template)
    index = {p: i for i, p in enumerate(torch_opt_sd["param_groups"][0]["params"])}
    per = {names[index[k]]: e for k, e in torch_opt_sd["state"].items()}

    def tensors(slot: str) -> dict[str, np.ndarray]:
        return {n: to_numpy(e[slot]) for n, e in per.items() if e.get(slot) is not None}

    new: dict[type, Any] = {}
    adam_step = None
    if kind == "adam":
        adam = parts[optax.ScaleByAdamState]
        adam_step = torch_step_count(torch_opt_sd)
        if step is not None and step != adam_step:
            raise OptimizerStateError(f"the Adam step count is {adam_step}, not the {step} steps given")
        new[optax.ScaleByAdamState] = optax.ScaleByAdamState(
            count=jnp.asarray(adam_step, adam.count.dtype),
            mu=_from_torch_layout(model, tensors("exp_avg"), adam.mu),
            nu=_from_torch_layout(model, tensors("exp_avg_sq"), adam.nu))
    elif kind == "sgd_momentum":
        trace = parts[optax.TraceState]
        new[optax.TraceState] = optax.TraceState(
            trace=_from_torch_layout(model, tensors("momentum_buffer"), trace.trace))
    position = step if step is not None else adam_step
    if position is None:
        raise OptimizerStateError("torch's SGD keeps no step count: pass step= (the optimizer steps "
                                  "taken, e.g. epochs done × steps per epoch)")
    sched = parts[optax.ScaleByScheduleState]
    new[optax.ScaleByScheduleState] = optax.ScaleByScheduleState(count=jnp.asarray(position, sched.count.dtype))
    return _replace(template, new)


def optimizer_tensors(torch_opt_sd: dict, param_names: list[str]) -> dict[str, np.ndarray]:
    """Every tensor of a torch optimizer ``state_dict`` by a readable name, parameter by
    parameter (``"conv1.weight.exp_avg"``, ``"conv1.weight.step"``, ...), as numpy arrays, so
    that two optimizer states compare tensor by tensor. ``param_names`` is ``param_names(model)``
    (or torch's ``[n for n, _ in model.named_parameters()]``)."""
    params = list(torch_opt_sd["param_groups"][0]["params"]) if torch_opt_sd["param_groups"] else []
    index = {p: i for i, p in enumerate(params)}
    out: dict[str, np.ndarray] = {}
    for key in sorted(torch_opt_sd["state"], key=lambda k: index.get(k, k)):
        name = param_names[index[key]]
        for slot, value in torch_opt_sd["state"][key].items():
            if value is not None:
                out[f"{name}.{slot}"] = np.array(to_numpy(value))
    return out


__all__ = ["OptimizerStateError", "check_torch_optimizer_state",
           "optimizer_state_from_torch", "optimizer_state_to_torch", "optimizer_tensors", "param_names",
           "torch_param_groups", "torch_step_count"]
