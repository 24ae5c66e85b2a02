"""Training parity: the JAX and torch engines' optimiser steps, step by step, from the same start.

``check_training(name, steps)`` converts one torch initialisation into Flax, then lets each
framework take ``steps`` optimiser steps of the net's recipe (optimizer, learning-rate schedule,
weight decay or L2 penalty) on the same batches: the same augmented images (drawn once by the JAX
engine's ``preprocess`` and handed to both) and, for dropout nets, the same dropout masks (drawn
once and applied on both sides in place of each framework's own draw). After every step every
parameter, BatchNorm statistic and optimizer-state tensor is compared. The check runs in float64
on both sides, where only a real difference shows; float32 figures are reported beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import flaxnets
import torch_ref
from flaxnets.engine import make_optimizer as jax_optimizer, preprocess, update_step
from flaxnets.fit import lr_schedule
from flaxnets.recipes import Recipe, recipe_for
from parity.comparison import to_float64
from parity.convert import to_numpy_state_dict, torch_to_flax
from parity.optim import optimizer_state_to_torch, optimizer_tensors
from torch_ref.engine import make_optimizer as torch_optimizer, train_step as torch_train_step

# Float64 rounding on either side, grown over the steps, stays near 1e-12 (measured, see
# docs/parity_training.md); each torch.optim/optax mismatch the recipes could hit is ≥ 1e-4 off
# (dampening 0.21, eps_root 1e-4, decoupled decay 2e-2, decay after momentum 5e-2). 1e-8 leaves
# four orders of magnitude on either side.
TRAIN_RTOL = 1e-8

# What torch.optim and optax do differently, and how the recipes' optimisers are matched.
OPTIMIZER_NOTES: dict[str, str] = {
    "adam": "torch Adam = optax.adam (eps added after sqrt of the bias-corrected second moment in "
            "both; optax's eps_root is not used); torch's Adam(weight_decay) would be coupled L2, "
            "chain(add_decayed_weights, adam), not adamw; no recipe uses it",
    "sgd": "torch SGD(momentum, weight_decay) = chain(add_decayed_weights(wd), sgd(lr, momentum)) "
           "(the decay enters the gradient before the momentum trace); torch's dampening has no optax "
           "option, so the recipes keep dampening 0",
}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max|a-b| / max|a|, ``a`` the torch tensor (absolute when ``a`` is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    scale = float(np.max(np.abs(a)))
    d = float(np.max(np.abs(a - b)))
    return d / scale if scale > 0 else d


@dataclass
class StepRow:
    """One optimiser step: the learning rate, both losses, and the worst tensor in each dtype."""

    step: int
    lr: float
    loss_torch: float
    loss_flax: float
    delta: float  # float64: max relative Δ over every parameter, statistic and optimizer tensor
    worst: str
    delta_f32: float = float("nan")
    worst_f32: str = ""


@dataclass
class TrainingParity:
    """The rows of ``check_training``; ``ok`` when every float64 step is within TRAIN_RTOL."""

    name: str
    recipe: Recipe
    batch_size: int
    rows: list[StepRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def first_failure(self) -> StepRow | None:
        """The first step whose float64 Δ exceeds TRAIN_RTOL (NaN counts), or None."""
        return next((r for r in self.rows if not r.delta <= TRAIN_RTOL), None)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and self.first_failure is None

    @property
    def failure(self) -> str | None:
        """One line naming the first step and tensor above the tolerance, or None."""
        r = self.first_failure
        if r is None:
            return None if self.rows else f"{self.name}: no step was taken"
        return (f"{self.name}: step {r.step}: {r.worst} differs by {r.delta:.2e} (relative, float64) "
                f"> {TRAIN_RTOL:.0e}")

    def table(self) -> str:
        """A markdown table, one row per step, then the notes and the verdict."""
        lines = [f"training parity of {self.name}: {len(self.rows)} steps of the {self.recipe.optimizer} "
                 f"recipe, batch {self.batch_size}; every parameter, BN statistic and optimizer tensor, "
                 f"max|Δ|/max|torch| per tensor, tolerance {TRAIN_RTOL:.0e} in float64",
                 "| step | lr | loss torch | loss flax | max rel Δ (f64) | worst tensor (f64) "
                 "| max rel Δ (f32) | worst tensor (f32) |",
                 "|---:|---:|---:|---:|---:|---|---:|---|"]
        lines += [f"| {r.step} | {r.lr:g} | {r.loss_torch:.6f} | {r.loss_flax:.6f} | {r.delta:.1e} "
                  f"| {r.worst} | {r.delta_f32:.1e} | {r.worst_f32} |" for r in self.rows]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"{self.name}: PASS" if self.ok else f"FAIL {self.failure}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------- the same dropout masks
class GivenMask(nnx.Variable):
    """A dropout mask handed in from outside (not a parameter, not a batch statistic)."""


class GivenDropout(nnx.Module):
    """``nnx.Dropout`` with its keep-mask given (``mask``, broadcastable to the input): the same
    arithmetic, x * mask / (1 - rate), with the mask torch also applies."""

    def __init__(self, rate: float, mask_shape: tuple[int, ...]):
        self.rate = rate
        self.mask = GivenMask(jnp.ones(mask_shape))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.mask[...].astype(x.dtype) / (1 - self.rate)


@dataclass
class _DropoutSite:
    path: str
    rate: float
    torch_shape: tuple[int, ...]  # keep-mask shape on the torch (NCHW) side
    channels_only: bool  # Dropout2d: one value per (sample, channel)


def _dropout_sites(tmodel: torch.nn.Module, x: torch.Tensor) -> list[_DropoutSite]:
    """The torch model's dropout layers with their mask shapes (from one forward of ``x``)."""
    sites, hooks = [], []
    for path, m in tmodel.named_modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            def hook(mod, inp, out, path=path):
                shape = tuple(inp[0].shape)
                two_d = isinstance(mod, (torch.nn.Dropout2d, torch.nn.Dropout3d))
                sites.append(_DropoutSite(path, float(mod.p), shape[:2] + (1,) * (len(shape) - 2)
                                          if two_d else shape, two_d))
            hooks.append(m.register_forward_hook(hook))
    # eval mode: a train-mode probe would update torch's BatchNorm statistics (hooks fire either way)
    was_training = tmodel.training
    tmodel.eval()
    try:
        with torch.no_grad():
            tmodel(x)
    finally:
        tmodel.train(was_training)
        for h in hooks:
            h.remove()
    return sites


def _to_nhwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, *range(2, a.ndim), 1)) if a.ndim >= 3 else a


@contextmanager
def _torch_masks(tmodel: torch.nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Replace the output of each torch dropout layer by input * mask / (1 - p)."""
    modules = dict(tmodel.named_modules())
    hooks = [modules[p].register_forward_hook(
        lambda mod, inp, out, p=p: inp[0] * masks[p] / (1 - mod.p) if mod.training else out)
        for p in masks]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _swap_flax_dropout(fmodel: nnx.Module, sites: list[_DropoutSite]) -> dict[str, GivenDropout]:
    """Put a ``GivenDropout`` in place of each nnx.Dropout at the torch sites' paths."""
    swapped = {}
    for s in sites:
        *parents, leaf = s.path.split(".")
        parent = fmodel
        for p in parents:
            parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
        old = getattr(parent, leaf)
        if not isinstance(old, nnx.Dropout):
            raise TypeError(f"{s.path} is a torch dropout layer but the Flax model has {type(old).__name__}")
        new = GivenDropout(float(old.rate), tuple(_to_nhwc(np.empty(s.torch_shape)).shape))
        setattr(parent, leaf, new)
        swapped[s.path] = new
    return swapped


# --------------------------------------------------------------------------- the check
def _schedule(recipe: Recipe, steps: int) -> tuple[Recipe, list[str]]:
    """The recipe with its step schedule compressed into ``steps`` (one step per epoch), so a
    short check still crosses its milestones; and the note saying so."""
    if not recipe.milestones:
        return recipe, []
    at = tuple(sorted({max(1, round(steps * m / recipe.epochs)) for m in recipe.milestones}))
    note = (f"schedule compressed to {steps} steps: lr ×{recipe.lr_gamma:g} from steps "
            f"{', '.join(str(a + 1) for a in at)} on (the recipe's epochs "
            f"{', '.join(map(str, recipe.milestones))} of {recipe.epochs})")
    return dataclasses.replace(recipe, milestones=at), [note]


def _batches(spec: flaxnets.NetSpec, recipe: Recipe, batch: int, steps: int, seed: int
             ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``steps`` model-ready NHWC float32 batches (random uint8 images through the JAX engine's
    preprocess, augmentation included) and their labels; parity-sized (DenseNet: 64×64)."""
    h, w, c = spec.check_shape
    out = []
    for i in range(steps):
        rng = np.random.default_rng([seed, i])
        x8 = rng.integers(0, 256, (batch, h, w, c), dtype=np.uint8)
        y = rng.integers(0, spec.num_classes, batch)
        x = preprocess(jnp.asarray(x8), recipe, jax.random.fold_in(jax.random.key(seed), i))
        out.append((np.array(x, np.float32), y))  # a writable copy: torch wraps it
    return out


def _run(name: str, recipe: Recipe, batches: list[tuple[np.ndarray, np.ndarray]], seed: int,
         dtype: Any) -> tuple[list[StepRow], bool]:
    """Both frameworks' steps in ``dtype``: one row per step, and whether the net has dropout."""
    f64 = dtype == np.float64
    torch.manual_seed(seed)
    tmodel = torch_ref.create(name)
    fmodel = torch_to_flax(name, tmodel.state_dict())
    tdtype = torch.float64 if f64 else torch.float32
    tmodel = tmodel.to(tdtype).train()
    sites = _dropout_sites(tmodel, torch.from_numpy(batches[0][0]).permute(0, 3, 1, 2).to(tdtype))
    names = [n for n, _ in tmodel.named_parameters()]
    lr_at = lr_schedule(recipe, 1)
    topt = torch_optimizer(recipe, tmodel.parameters())
    tx = jax_optimizer(recipe, 1)[0]
    rows = []
    with jax.enable_x64(f64):
        fmodel = to_float64(fmodel) if f64 else fmodel
        swapped = _swap_flax_dropout(fmodel, sites)
        fmodel.train()
        graphdef, params, rest = nnx.split(fmodel, nnx.Param, ...)
        opt_state = tx.init(params)
        step = jax.jit(partial(update_step, tx=tx, recipe=recipe), static_argnums=0)
        for i, (x, y) in enumerate(batches):
            rng = np.random.default_rng([seed, i, 1])
            keep = {s.path: (rng.random(s.torch_shape) >= s.rate).astype(dtype) for s in sites}
            for path, m in keep.items():
                swapped[path].mask.set_value(jnp.asarray(_to_nhwc(m)))
            _, params, rest = nnx.split(fmodel, nnx.Param, ...)  # rest: with the masks just set
            for g in topt.param_groups:
                g["lr"] = lr_at(i)
            xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).to(tdtype)
            with _torch_masks(tmodel, {p: torch.from_numpy(m) for p, m in keep.items()}):
                ce_t, _ = torch_train_step(tmodel, topt, xt, torch.from_numpy(y), recipe)
            (params, rest), opt_state, sums = step(graphdef, (params, rest), opt_state,
                                                   jnp.asarray(x, dtype), jnp.asarray(y, jnp.int32),
                                                   jnp.ones(len(y), bool))
            nnx.update(fmodel, params, rest)
            got = dict(to_numpy_state_dict(fmodel))
            opt_sd = optimizer_state_to_torch(opt_state, fmodel, recipe, lr_at(i), param_order=names)
            got.update(optimizer_tensors(opt_sd, names))
            want = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
            want.update(optimizer_tensors(topt.state_dict(), names))
            missing = sorted(set(want) ^ set(got))
            if missing:
                raise KeyError(f"tensors on one side only: {', '.join(missing[:5])}")
            deltas = {k: _rel(want[k], got[k]) for k in want}
            worst = max(deltas, key=lambda k: (np.isnan(deltas[k]), np.nan_to_num(deltas[k])))  # NaN first
            rows.append(StepRow(i + 1, lr_at(i), float(ce_t), float(sums[0]) / len(y), deltas[worst], worst))
    return rows, bool(sites)


def check_training(name: str, steps: int, seed: int = 0, batch: int | None = None,
                   recipe: Recipe | None = None) -> TrainingParity:
    """``steps`` optimiser steps of net ``name``'s recipe (or ``recipe``) in both frameworks,
    compared after each (float64, and float32 beside it); ``batch`` defaults to the recipe's."""
    spec = flaxnets.get_spec(name)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    recipe, notes = _schedule(recipe or recipe_for(name), steps)
    bs = batch or recipe.batch_size
    res = TrainingParity(name, recipe, bs, notes=notes + [OPTIMIZER_NOTES[recipe.optimizer]])
    if recipe.l2:
        res.notes.append(f"L2 penalty {recipe.l2:g}·Σw² over every parameter, in the loss on both sides")
    if recipe.augment != "none":
        res.notes.append(f"augmentation ({recipe.augment}) drawn once by the JAX engine and handed to both")
    batches = _batches(spec, recipe, bs, steps, seed)
    res.rows, dropout = _run(name, recipe, batches, seed, np.float64)
    if dropout:
        res.notes.append("dropout: each step's keep-masks drawn once (numpy) and applied on both sides")
    for row, r32 in zip(res.rows, _run(name, recipe, batches, seed, np.float32)[0]):
        row.delta_f32, row.worst_f32 = r32.delta, r32.worst
    return res
