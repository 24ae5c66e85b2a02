"""A training state carried across frameworks: a run resumed in the other one, and a plain
PyTorch checkpoint resumed in either.

The state travels in plain PyTorch's layout, ``{'model': state_dict, 'optimizer':
optimizer.state_dict()}`` (torch names and layouts; ``parity.convert`` for the weights and
BatchNorm statistics, ``parity.optim`` for the optimizer state and the schedule's position):
the torch engine's own snapshot, what ``torch.save({'model': ..., 'optimizer': ..., 'epoch': e})``
writes, and what the JAX engine's snapshot converts to and from. ``flaxnets.fit.fit`` takes the
importers below as ``import_state`` and writes what they give as the engine's own checkpoints.

What does not cross: the JAX model's dropout RNG state (torch draws dropout from a generator
seeded per epoch; a JAX run resumed from torch starts its dropout stream from the seed), and
the augmentation and dropout draws (see ``flaxnets.fit.epoch_permutation``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flax import nnx

import flaxnets
from flaxnets import checkpoint
from flaxnets.engine import load_train_state as load_jax_state, local_copy, state_template
from flaxnets.fit import CheckpointError, Engine, StateImporter, check_resumable, checkpoint_paths, run_meta
from flaxnets.recipes import Recipe
from parity.convert import StateDictMismatchError, check_state_dict, load_state_dict, to_numpy, to_numpy_state_dict
from parity.files import read_weights
from parity.optim import (OptimizerStateError, check_torch_optimizer_state, optimizer_state_from_torch,
                          optimizer_state_to_torch, torch_step_count)
from torch_ref.engine import load_train_state as load_torch_state

# where plain PyTorch training scripts keep the optimizer state next to the model's
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt")


def jax_to_torch_layout(snapshot: Any, model: nnx.Module, recipe: Recipe, lr: float) -> dict[str, Any]:
    """A JAX engine snapshot ((params, rest), opt_state) of ``model``'s net as {'model': torch
    state_dict (numpy), 'optimizer': torch optimizer state_dict} with ``lr`` in its param group.
    The snapshot's weights are written into ``model`` (a clone would list its keys sorted)."""
    (params, rest), opt_state = local_copy(snapshot)
    nnx.update(model, params, rest)
    return {"model": to_numpy_state_dict(model),
            "optimizer": optimizer_state_to_torch(opt_state, model, recipe, lr)}


def torch_layout_to_jax(layout: Mapping[str, Any], model: nnx.Module, recipe: Recipe,
                        steps_per_epoch: int, step: int) -> Any:
    """{'model', 'optimizer'} in torch layout as a JAX snapshot ((params, rest), opt_state) of
    ``model``'s net after ``step`` optimizer steps (unplaced). ``model`` gives the structure and
    the state torch does not have (dropout RNGs). Raises StateDictMismatchError or
    OptimizerStateError when the state does not fit."""
    clone = nnx.clone(model)
    load_state_dict(clone, layout["model"], what="net")
    opt_state = optimizer_state_from_torch(dict(layout["optimizer"]), model, recipe, steps_per_epoch,
                                           step=step)
    _, params, rest = nnx.split(clone, nnx.Param, ...)
    return (params, rest), opt_state


def to_engine(engine: Engine, layout: Mapping[str, Any], epoch: int, where: str | Path) -> Any:
    """The snapshot for ``engine`` (either framework) of a torch-layout state after ``epoch``
    epochs; what does not fit the engine's net and recipe is one CheckpointError naming ``where``."""
    step = epoch * engine.steps
    try:
        if engine.backend == "jax":
            return engine.place(torch_layout_to_jax(layout, engine.model, engine.recipe, engine.steps, step))
        model = engine.model
        check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, layout["model"], "net")
        names = [n for n, _ in model.named_parameters()]
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        check_torch_optimizer_state(layout["optimizer"], names, shapes, engine.recipe)
        counted = torch_step_count(layout["optimizer"])
        if counted is not None and counted != step:
            raise OptimizerStateError(f"the Adam step count is {counted}, not the {step} steps given")
        return {"model": {k: torch.from_numpy(np.array(to_numpy(v))) for k, v in layout["model"].items()},
                "optimizer": layout["optimizer"]}
    except StateDictMismatchError as e:
        raise CheckpointError(f"{where}: {e.summary()}") from None
    except OptimizerStateError as e:
        hint = ""
        if "steps given" in str(e):
            hint = (f" ({epoch} epochs done × {engine.steps} steps per epoch at batch size "
                    f"{engine.recipe.batch_size}: the epoch counts the epochs done, and the batch "
                    f"size must be the one it trained with)")
        raise CheckpointError(f"{where}: {e}{hint}") from None


def read_run_state(path: Path, backend: str, engine: Engine) -> tuple[dict[str, Any], dict[str, Any]]:
    """(torch-layout state, meta) of the ``backend`` training checkpoint ``path`` of the run that
    ``engine`` continues; a checkpoint of another net, seed, class count or recipe is refused
    (before its arrays are read)."""
    want = run_meta(engine.name, backend, engine.seed, engine.num_classes, engine.recipe)
    if backend == "torch":
        snapshot, meta = load_torch_state(path, engine.name, engine.num_classes)
        check_resumable(meta, want)
        return snapshot, meta
    _, meta = checkpoint.read_meta(path)
    check_resumable(meta, want)
    model = flaxnets.create(engine.name, num_classes=engine.num_classes, seed=engine.seed)
    snapshot, meta = load_jax_state(path, engine.name, engine.num_classes,
                                    state_template(model, engine.recipe, engine.steps))
    epoch = int(meta["epoch"])
    return jax_to_torch_layout(snapshot, model, engine.recipe, engine.lr_at(epoch * engine.steps)), meta


def run_importer(run_dir: str | Path, backend: str) -> StateImporter:
    """``fit``'s ``import_state`` continuing the run in ``run_dir`` from its ``backend``
    checkpoints, in the engine's framework (``scripts/train.py --resume RUN --backend ...``)."""
    def import_state(engine: Engine, which: str) -> tuple[Any, dict[str, Any]]:
        path = checkpoint_paths(run_dir, backend)[which]
        layout, meta = read_run_state(path, backend, engine)
        return to_engine(engine, layout, int(meta["epoch"]), path), dict(meta, backend=engine.backend)

    return import_state


def read_torch_checkpoint(path: str | Path, net: str) -> tuple[dict[str, Any], int, list[str]]:
    """(torch-layout state, epochs done, notes) of a plain PyTorch checkpoint of net ``net``:
    ``torch.save({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': e}, path)``,
    ``e`` the epochs done. The model's state_dict is read as ``parity.read_weights`` reads weights
    (other wrapper names, ``module.`` prefixes, CUDA tensors); the optimizer's under one of
    ``OPTIMIZER_KEYS``. Loaded with ``weights_only=True``."""
    path = Path(path)
    weights = read_weights(path, net)  # refuses what is no torch file, or runs code, in one line
    if weights.format != "torch":
        raise CheckpointError(f"{path} is a {weights.format} file: weights only, no optimizer state")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    found = [k for k in OPTIMIZER_KEYS if isinstance(raw, Mapping) and isinstance(raw.get(k), Mapping)]
    if not found:
        held = ", ".join(map(repr, list(raw)[:6])) if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointError(f"{path} holds no optimizer state (looked for {', '.join(OPTIMIZER_KEYS)}; "
                              f"it holds {held}): save opt.state_dict() next to the model to resume")
    epoch = raw.get("epoch")
    if isinstance(epoch, torch.Tensor) and epoch.numel() == 1:
        epoch = epoch.item()
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or epoch != int(epoch) or epoch < 0:
        raise CheckpointError(f"{path} has no 'epoch' (the epochs done, an integer >= 0): "
                              f"found {epoch!r}")
    return {"model": weights.state_dict, "optimizer": raw[found[0]]}, int(epoch), weights.notes


def torch_checkpoint_importer(path: str | Path) -> StateImporter:
    """``fit``'s ``import_state`` starting a run from a plain PyTorch checkpoint
    (``read_torch_checkpoint``) after its epochs (``scripts/train.py --resume-from-torch``)."""
    def import_state(engine: Engine, which: str) -> tuple[Any, dict[str, Any]]:
        if which != "last":  # the run has no best epoch before its first
            raise CheckpointError(f"{path} has no best-validation state")
        layout, epoch, _ = read_torch_checkpoint(path, engine.name)
        meta = dict(run_meta(engine.name, engine.backend, engine.seed, engine.num_classes, engine.recipe),
                    epoch=epoch, metrics=[], best_val_acc=-1.0, best_epoch=0)
        return to_engine(engine, layout, epoch, path), meta

    return import_state
