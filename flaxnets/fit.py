"""The epoch loop both engines run, and what it needs: splits, schedules, the Engine protocol.

Framework-neutral (numpy only): ``fit(..., backend="jax")`` drives ``flaxnets.engine.JaxEngine``
and ``backend="torch"`` drives ``torch_ref.engine.TorchEngine`` through the same loop, so the two
backends train on the same splits and report the same metrics.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flaxnets.data import Dataset
from flaxnets.metrics import confusion_matrix
from flaxnets.recipes import Recipe, recipe_for
from flaxnets.registry import check_image_shape, get_spec

NAN_CHECK_EVERY = 50  # steps between loss checks; each check waits for one step (measured: <1 %)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the run resuming from it."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the run stops and keeps its last good checkpoint."""

    def __init__(self, epoch: int, step: int, global_step: int, value: float):
        self.epoch, self.step, self.global_step, self.value = epoch, step, global_step, value
        super().__init__(f"the training loss became {value} at step {global_step + 1} "
                         f"(epoch {epoch + 1}, step {step + 1} of the epoch)")


@dataclass
class Splits:
    """The arrays one run trains, validates (optional) and tests on; uint8 NHWC + int labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    def eval_sets(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{'val': (x, y), 'test': (x, y)} for the splits that exist, validation first."""
        out = {"val": (self.x_val, self.y_val)} if self.x_val is not None else {}
        out["test"] = (self.x_test, self.y_test)
        return out


def split_arrays(x: np.ndarray, y: np.ndarray, fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random (1-fraction, fraction) split of (x, y), reproducible from ``seed``."""
    perm = np.random.default_rng(seed).permutation(len(x))
    n_hold = int(round(len(x) * fraction))
    if n_hold == 0 or n_hold == len(x):
        raise ValueError(f"cannot split {len(x)} examples {1 - fraction:.0%}/{fraction:.0%}")
    keep, hold = perm[n_hold:], perm[:n_hold]
    return x[keep], y[keep], x[hold], y[hold]


def make_splits(data: Dataset, recipe: Recipe, seed: int) -> Splits:
    """Train/val/test arrays by the recipe: a test split carved out if the data has none, then val."""
    x_tr, y_tr, x_te, y_te = data.x_train, data.y_train, data.x_test, data.y_test
    if len(x_te) == 0:
        if not recipe.test_fraction:
            raise ValueError("the dataset has no test set and the recipe has no test_fraction")
        x_tr, y_tr, x_te, y_te = split_arrays(x_tr, y_tr, recipe.test_fraction, seed)
    if recipe.val_fraction:
        x_tr, y_tr, x_val, y_val = split_arrays(x_tr, y_tr, recipe.val_fraction, seed + 1)
        return Splits(x_tr, y_tr, x_te, y_te, x_val, y_val)
    return Splits(x_tr, y_tr, x_te, y_te)


def lr_schedule(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate at a global step, in Python (metrics show 0.1, not float32 0.10000000149)."""
    def lr_at(step: int) -> float:
        return recipe.lr * recipe.lr_gamma ** sum(step >= m * steps_per_epoch for m in recipe.milestones)

    return lr_at


def epoch_batches(name: str, n_train: int, batch_size: int) -> tuple[int, int]:
    """(steps, examples trained) per epoch of net ``name``.

    Every example, the last batch partial, as the material's DataLoader (no drop_last) does;
    a net with BatchNorm drops a partial last batch instead: its batch statistics would be
    those of a few examples, and the JAX engine's fixed-shape step cannot mask them out.
    """
    if get_spec(name).batch_norm:
        if n_train < batch_size:
            raise ValueError(f"{n_train} training examples are fewer than one batch of {batch_size}"
                             f" (net {name!r} has BatchNorm and trains full batches only)")
        steps = n_train // batch_size
        return steps, steps * batch_size
    if n_train < 1:
        raise ValueError("no training examples")
    return -(-n_train // batch_size), n_train


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` of a run seeded ``seed`` visits its ``n`` training
    examples (int64), the same in both engines.

    Drawn with numpy from (seed, epoch) alone, so an epoch's batches depend on nothing before it
    (resume is bit-exact) nor on the framework: a run resumed in the other framework trains the
    very batches it would have. What still differs between the frameworks is their random
    augmentation (crop and flip offsets) and dropout masks, drawn from each framework's own
    generator: the ResNets (crop and flip) and ``net_dropout`` continue with other draws, the same
    training in distribution but not in numbers; the nets with neither (LeNet, the dilated CNN,
    the other cifar2 nets, the DenseNets) train the same numbers up to float rounding.
    """
    return np.random.default_rng((seed % 2**64, epoch)).permutation(n)


def first_non_finite(losses: np.ndarray) -> int | None:
    """Index of the first NaN/Inf in ``losses``, or None."""
    bad = np.flatnonzero(~np.isfinite(losses))
    return int(bad[0]) if bad.size else None


class Engine(Protocol):
    """What ``fit`` drives: one net's training state and steps in one framework.

    ``flaxnets.engine.JaxEngine`` and ``torch_ref.engine.TorchEngine`` implement it. An epoch
    takes its permutation (``epoch_permutation``) and augmentation from (seed, epoch) only, so
    resuming from an epoch's checkpoint is bit-exact. ``fit`` calls ``save_state``,
    ``load_state`` and ``has_state`` on every process of a multi-host run (a JAX save is
    collective: orbax writes each array once);
    ``writes_files`` tells the caller which process writes the run directory's other files.
    """

    backend: str
    name: str
    seed: int
    num_classes: int
    recipe: Recipe
    model: Any  # nnx.Module (jax) or torch.nn.Module (torch)
    steps: int  # optimiser steps per epoch
    examples: int  # examples trained per epoch
    devices: int
    compile_seconds: float
    writes_files: bool  # False on the non-primary processes of a multi-host run
    lr_at: Callable[[int], float]

    def train_epoch(self, epoch: int, progress: Callable[[int, int, int], None] | None = None
                    ) -> np.ndarray: ...
    def evaluate(self, split: str) -> tuple[float, float, np.ndarray]: ...
    def get_state(self) -> Any: ...
    def set_state(self, snapshot: Any) -> None: ...
    def save_state(self, snapshot: Any, path: Path, meta: dict[str, Any]) -> Path: ...
    def load_state(self, path: Path) -> tuple[Any, dict[str, Any]]: ...
    @staticmethod
    def has_state(path: Path) -> bool: ...
    def final_model(self) -> Any: ...
    def torch_state_dict(self) -> dict[str, np.ndarray]: ...


@dataclass
class FitResult:
    """What ``fit`` returns: per-epoch metrics, final test metrics and the trained model."""

    metrics: list[dict[str, Any]]
    test_loss: float
    test_acc: float
    confusion: np.ndarray  # (classes, classes): rows true label, columns prediction
    class_names: list[str]
    eval_split: str  # 'val' or 'test': the split that picks the kept weights / the curves show
    model: Any  # nnx.Module (jax) or torch.nn.Module (torch)
    compile_seconds: float
    test_preds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    test_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    test_images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 1), np.uint8))
    engine: Any = None  # the JaxEngine / TorchEngine (exports, further evaluation)
    info: dict[str, Any] = field(default_factory=dict)


ENGINES = {"jax": ("flaxnets.engine", "JaxEngine"), "torch": ("torch_ref.engine", "TorchEngine")}


def engine_class(backend: str) -> type:
    """The engine class of ``backend`` ('jax' or 'torch').

    Looked up by name: this loop must import neither framework, and a torch run never loads JAX.
    """
    if backend not in ENGINES:
        raise ValueError(f"unknown backend {backend!r}; expected 'jax' or 'torch'")
    module, cls = ENGINES[backend]
    return getattr(importlib.import_module(module), cls)


def has_checkpoint(path: str | Path, backend: str) -> bool:
    """Whether ``path`` (one of ``checkpoint_paths``) holds a finished ``backend`` checkpoint."""
    return engine_class(backend).has_state(Path(path))


def make_engine(backend: str, name: str, splits: Splits, num_classes: int, recipe: Recipe,
                seed: int) -> Engine:
    """The engine of ``backend`` ('jax' or 'torch') for one run."""
    return engine_class(backend)(name, splits, num_classes, recipe, seed)


def checkpoint_paths(run_dir: str | Path, backend: str) -> dict[str, Path]:
    """{'last': ..., 'best': ...} checkpoints of a run directory for ``backend``: orbax
    directories for JAX, single ``.pt`` files for torch."""
    suffix = "" if backend == "jax" else ".pt"
    d = Path(run_dir) / "checkpoints"
    return {"last": d / f"last{suffix}", "best": d / f"best{suffix}"}


# import_state(engine, which): the (snapshot, meta) of checkpoint 'last' or 'best' for ``engine``
# from somewhere other than its own checkpoints (``fit``'s import_state)
StateImporter = Callable[[Engine, str], tuple[Any, dict[str, Any]]]


def run_meta(name: str, backend: str, seed: int, num_classes: int, recipe: Recipe) -> dict[str, Any]:
    """What every checkpoint's meta records of its run, and what a resume must match."""
    return {"net": name, "backend": backend, "seed": seed, "num_classes": num_classes,
            "recipe": dataclasses.asdict(recipe)}


def fit(name: str, data: Dataset, recipe: Recipe | None = None, seed: int = 0,
        progress: Callable[[int, int, int], None] | None = None,
        on_epoch: Callable[[list[dict[str, Any]]], None] | None = None, *, backend: str = "jax",
        run_dir: str | Path | None = None, resume: bool = False,
        on_start: Callable[[int], None] | None = None,
        import_state: StateImporter | None = None) -> FitResult:
    """Train net ``name`` on ``data`` with ``recipe`` (its family's default if None).

    ``progress(epoch, step, steps)`` is called after each dispatched step, ``on_start(epoch)``
    once the engine is built (and a resumed state loaded), before the first epoch it trains, and
    ``on_epoch(rows)`` after each epoch with the metrics of every epoch so far (a resumed run's
    earlier ones included). With ``run_dir`` the last and best training states are written to
    ``run_dir/checkpoints`` after every epoch, and ``resume`` continues from the last one: the
    final metrics equal the uninterrupted run's bit for bit on CPU (same seed, same data).
    A NaN/Inf loss raises NonFiniteLossError; the checkpoints keep the last good epoch.

    ``import_state`` resumes from a state that is not this engine's own checkpoint (another
    framework's, ``parity.train_state``): ``import_state(engine, 'last' | 'best')`` gives
    (snapshot, meta), and the states are written as this engine's checkpoints before the first
    epoch trains, so that from then on the run resumes as its own.
    """
    recipe = recipe or recipe_for(name)
    check_image_shape(name, data.image_shape)
    splits = make_splits(data, recipe, seed)
    engine = make_engine(backend, name, splits, data.num_classes, recipe, seed)
    validating = splits.x_val is not None
    eval_split = "val" if validating else "test"
    paths = checkpoint_paths(run_dir, backend) if run_dir is not None else None
    meta_base = run_meta(name, backend, seed, data.num_classes, recipe)

    metrics: list[dict[str, Any]] = []
    best_acc, best_epoch, best_state, start = -1.0, 0, None, 0
    if resume:
        if paths is None or (import_state is None and not engine.has_state(paths["last"])):
            raise FileNotFoundError(f"nothing to resume: no checkpoint {paths and paths['last']}")
        load = ((lambda which: engine.load_state(paths[which])) if import_state is None
                else (lambda which: import_state(engine, which)))
        snapshot, meta = load("last")
        check_resumable(meta, meta_base, backend=import_state is None)
        if int(meta["epoch"]) > recipe.epochs:
            raise ValueError(f"cannot resume: the run has trained {meta['epoch']} epochs, more "
                             f"than the {recipe.epochs} asked for; ask for {meta['epoch']} or more")
        metrics, start = list(meta["metrics"]), int(meta["epoch"])
        best_acc, best_epoch = float(meta["best_val_acc"]), int(meta["best_epoch"])
        if validating and best_epoch and best_epoch != start:
            best_state, best_meta = load("best")
            if best_meta.get("epoch") != best_epoch:
                raise CheckpointError(f"the best checkpoint of {run_dir} holds epoch "
                                      f"{best_meta.get('epoch')}, its last one names epoch {best_epoch}")
        engine.set_state(snapshot)
        meta = dict(meta, backend=backend)
        if import_state is not None:  # from now on the run resumes from its own checkpoints
            engine.save_state(snapshot, paths["last"], meta)
            if best_state is not None:
                engine.save_state(best_state, paths["best"], dict(best_meta, backend=backend))
        if validating and best_epoch and best_epoch == start:
            # the last epoch was the best: its state is the one just loaded, written again as
            # 'best', which lacks it if the run stopped between that epoch's two saves
            best_state = snapshot
            engine.save_state(snapshot, paths["best"], meta)

    if on_start:
        on_start(start)
    for epoch in range(start, recipe.epochs):
        t_ep = time.perf_counter()
        lr = engine.lr_at(epoch * engine.steps)
        sums = engine.train_epoch(epoch, progress)
        train_s = time.perf_counter() - t_ep
        n = engine.examples
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": float(sums[:, 0].sum() / n),
                               "train_acc": float(sums[:, 1].sum() / n)}
        for split in splits.eval_sets():
            row[f"{split}_loss"], row[f"{split}_acc"], _ = engine.evaluate(split)
        row.update(images_per_s=n / train_s, seconds=time.perf_counter() - t_ep)
        metrics.append(row)
        improved = validating and row["val_acc"] > best_acc
        if improved:
            best_acc, best_epoch = row["val_acc"], epoch + 1
        if improved or paths is not None:
            snap = engine.get_state()
            best_state = snap if improved else best_state
            if paths is not None:  # every process: see Engine
                meta = dict(meta_base, epoch=epoch + 1, metrics=metrics, best_val_acc=best_acc,
                            best_epoch=best_epoch)
                engine.save_state(snap, paths["last"], meta)
                if improved:
                    engine.save_state(snap, paths["best"], meta)
        if on_epoch:
            on_epoch(metrics)

    if validating and best_state is not None:
        engine.set_state(best_state)  # the best-validation weights are the ones kept
    test_loss, test_acc, preds = engine.evaluate("test")
    k = data.num_classes
    labels = np.asarray(splits.y_test, np.int64)
    confusion = confusion_matrix(labels, preds, k)
    info = {"train_examples": len(splits.x_train),
            "val_examples": 0 if splits.x_val is None else len(splits.x_val),
            "test_examples": len(splits.x_test), "steps_per_epoch": engine.steps,
            "examples_per_epoch": engine.examples,
            "devices": getattr(engine, "devices", 1), "backend": backend,
            "best_val_acc": best_acc if validating else None,
            "best_epoch": best_epoch if validating else None, "resumed_from_epoch": start or None}
    return FitResult(metrics, test_loss, test_acc, confusion, list(data.class_names), eval_split,
                     engine.final_model(), engine.compile_seconds, preds, labels, splits.x_test,
                     engine, info)


def check_resumable(meta: dict[str, Any], now: dict[str, Any], backend: bool = True) -> None:
    """Refuse to resume a checkpoint made with another net, seed, classes or recipe (``now``:
    ``run_meta``), or, unless ``backend`` is False (a state carried across), another backend."""
    for k in ("net", "backend", "seed", "num_classes") if backend else ("net", "seed", "num_classes"):
        if meta.get(k) != now[k]:
            raise ValueError(f"cannot resume: the checkpoint has {k}={meta.get(k)!r}, this run {now[k]!r}")
    # a field the checkpoint's recipe lacks (written before the field existed) has its default
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)
                if f.default is not dataclasses.MISSING}
    old = {k: v for k, v in {**defaults, **meta["recipe"]}.items() if k != "epochs"}
    new = {k: v for k, v in now["recipe"].items() if k != "epochs"}
    old = json.loads(json.dumps(old))  # tuples were saved as lists
    new = json.loads(json.dumps(new))
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        raise ValueError(f"cannot resume: the recipe differs from the checkpoint's: {diff}")
