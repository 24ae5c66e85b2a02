"""Training recipes (one per net family) and the JAX training engine, run writing and summaries.

The engine splits the NNX model once into (graphdef, params, rest) and runs pure, jitted steps
with donated state; the dataset sits on the device as uint8 and is normalised/augmented inside
the step. Batches are sharded along a 'data' mesh axis (params replicated), so it scales to
several devices and still runs on one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import flaxnets
from flaxnets import checkpoint
from flaxnets.data import Dataset
from flaxnets.metrics import confusion_matrix
from flaxnets.introspect import count_params, record_outputs
from flaxnets.registry import check_image_shape

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """How one net family is trained (the issue's table)."""

    dataset: str
    optimizer: str  # 'adam' | 'sgd'
    lr: float
    batch_size: int
    epochs: int
    momentum: float = 0.0
    weight_decay: float = 0.0  # decoupled from the loss, added to the gradient as torch's SGD does
    l2: float = 0.0  # loss += l2 * sum(w**2) over all parameters
    milestones: tuple[int, ...] = ()  # epochs at which lr *= lr_gamma
    lr_gamma: float = 0.1
    normalize: str = "unit"  # 'unit' ([0, 1]) | 'imagenet' (mean/std after [0, 1])
    augment: str = "none"  # 'none' | 'crop_flip' (random crop with 4-pixel zero pad + h-flip)
    val_fraction: float = 0.0  # held out of train for validation; the best-val weights are kept
    test_fraction: float = 0.0  # carved out of train when the dataset has no test set


_CIFAR2 = Recipe("cifar2", "sgd", 1e-2, 64, 100)
RECIPES: dict[str, Recipe] = {
    "lenet": Recipe("fashion_mnist", "adam", 1e-3, 256, 5),
    "dilated": Recipe("fashion_mnist", "adam", 3e-4, 64, 25, val_fraction=0.2),
    "net": _CIFAR2,
    "net_batchnorm": dataclasses.replace(_CIFAR2, l2=1e-3),
    "resnet": Recipe("cifar10", "sgd", 0.1, 128, 200, momentum=0.9, weight_decay=1e-4,
                     milestones=(100, 150), normalize="imagenet", augment="crop_flip"),
    "densenet": Recipe("image_folder", "adam", 1e-4, 32, 20, normalize="imagenet",
                       test_fraction=0.2),
}


def recipe_family(name: str) -> str:
    """The RECIPES key of net ``name`` (resnet56 -> 'resnet', net_width -> 'net')."""
    flaxnets.get_spec(name)  # unknown names raise UnknownNetError
    if name.startswith("resnet"):
        return "resnet"
    if name.startswith("densenet"):
        return "densenet"
    if name in ("net", "net_width", "net_dropout"):
        return "net"
    return name


def recipe_for(name: str, **overrides: Any) -> Recipe:
    """The recipe of net ``name`` with ``overrides`` (None values are ignored) applied."""
    return dataclasses.replace(RECIPES[recipe_family(name)],
                               **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------- pure step functions
def random_crop_flip(x: jax.Array, rng: jax.Array, pad: int = 4) -> jax.Array:
    """Per-image random crop of the zero-padded batch back to its size, then a random h-flip."""
    b, h, w, c = x.shape
    k_off, k_flip = jax.random.split(rng)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    off = jax.random.randint(k_off, (b, 2), 0, 2 * pad + 1)
    crop = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(xp, off)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)


def preprocess(x_uint8: jax.Array, recipe: Recipe, rng: jax.Array | None = None) -> jax.Array:
    """uint8 NHWC -> float32 model input: [0, 1] scaling, augmentation if ``rng``, normalisation."""
    x = x_uint8.astype(jnp.float32) / 255.0
    if rng is not None and recipe.augment == "crop_flip":
        x = random_crop_flip(x, rng)
    if recipe.normalize == "imagenet":
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x


def train_step(graphdef: nnx.GraphDef, state: tuple[nnx.State, nnx.State], opt_state: Any,
               x_uint8: jax.Array, y: jax.Array, mask: jax.Array, rng: jax.Array, *,
               tx: optax.GradientTransformation, recipe: Recipe) -> tuple[Any, Any, jax.Array]:
    """One optimiser step on the examples ``mask`` keeps (a padded partial batch keeps fewer);
    returns (state, opt_state, [summed CE loss, correct count])."""
    params, rest = state
    m = mask.astype(jnp.float32)
    count = jnp.sum(m)
    x = preprocess(x_uint8, recipe, rng)

    def loss_fn(p: nnx.State, rest: nnx.State) -> tuple[jax.Array, tuple[jax.Array, jax.Array, nnx.State]]:
        # copy=True: fresh Variables at this (grad) trace level, so BatchNorm may update them
        model = nnx.merge(graphdef, p, rest, copy=True)
        logits = model(x)
        # the mean over the kept examples: a padded tail batch's gradient is its own batch's
        ce = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y) * m) / count
        loss = ce
        if recipe.l2:
            loss = loss + recipe.l2 * sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(p))
        return loss, (ce, logits, nnx.split(model, nnx.Param, ...)[2])

    (_, (ce, logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * m)
    return (params, new_rest), opt_state, jnp.stack([ce * count, correct])


def eval_step(graphdef: nnx.GraphDef, state: tuple[nnx.State, nnx.State], x_uint8: jax.Array,
              y: jax.Array, mask: jax.Array, *, recipe: Recipe) -> tuple[jax.Array, jax.Array]:
    """Masked sums [CE loss, correct, count] and the predictions of one (padded) eval batch."""
    model = nnx.merge(graphdef, *state)
    logits = model(preprocess(x_uint8, recipe))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    pred = jnp.argmax(logits, -1)
    m = mask.astype(jnp.float32)
    return jnp.stack([jnp.sum(ce * m), jnp.sum((pred == y) * m), jnp.sum(m)]), pred


# --------------------------------------------------------------------------- shared by both engines
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


# XLA:CPU compile options of a net's steps where they measured faster than XLA's defaults
# (2-core x86, jax 0.10.2, the same step compiled both ways and timed in one process,
# 2026-11-22). Without YNN library fusions (dots and reductions then go to XLA's own emitters),
# lenet: 1.15x median over 40 alternating rounds of 8 steps (IQR 1.08-1.19x, faster in 98% of
# rounds; single interleaved runs said 0.95-1.20x, this machine drifts). The same for the others
# (24 rounds): dilated 0.94x, net 0.99x, net_width 0.92x, net_dropout 0.97x, net_batchnorm
# 0.54x; resnet20 0.95x (one run): only lenet takes it. (On lenet, on top of it: oneDNN 1.02x,
# no XNNPACK 1.00x, the concurrency-optimised scheduler 1.00x: not taken.)
# 512-bit vectors in XLA's own loops (its default is 256 even where AVX-512 is there), for the
# CIFAR-2 nets, whose steps are mostly such loops (the first conv's tap sum, tanh, pools,
# BatchNorm): net 1.13x (IQR 1.05-1.20, faster in 83% of 12 rounds of 10 steps), net_width
# 1.10x (1.08-1.12, 90% of 10), net_dropout 1.17x (1.04-1.22, 75% of 12), net_batchnorm 1.30x
# (1.25-1.46, 100% of 12); nothing for lenet 0.99x, dilated 0.97x, resnet20 0.99x, densenet121
# 1.00x (2026-11-23). A preference, not a demand: capped at AVX2 (xla_cpu_max_isa) a small
# function compiled with it gave the same numbers.
_WIDE_VECTORS = {"xla_cpu_prefer_vector_width": 512}
CPU_COMPILE_OPTIONS: dict[str, dict[str, Any]] = {
    "lenet": {"xla_cpu_experimental_ynn_fusion_type": ""},
    **{name: _WIDE_VECTORS for name in ("net", "net_width", "net_dropout", "net_batchnorm")},
}


def compile_options(name: str) -> dict[str, Any]:
    """The XLA compile options of net ``name``'s train and eval steps on this backend."""
    from flaxnets.layers import speedup_on

    if jax.default_backend() != "cpu" or not speedup_on("cpu_compile_options"):
        return {}
    return dict(CPU_COMPILE_OPTIONS.get(name, {}))


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
    if flaxnets.get_spec(name).batch_norm:
        if n_train < batch_size:
            raise ValueError(f"{n_train} training examples are fewer than one batch of {batch_size}"
                             f" (net {name!r} has BatchNorm and trains full batches only)")
        steps = n_train // batch_size
        return steps, steps * batch_size
    if n_train < 1:
        raise ValueError("no training examples")
    return -(-n_train // batch_size), n_train


def first_non_finite(losses: np.ndarray) -> int | None:
    """Index of the first NaN/Inf in ``losses``, or None."""
    bad = np.flatnonzero(~np.isfinite(losses))
    return int(bad[0]) if bad.size else None


NAN_CHECK_EVERY = 50  # steps between loss checks; each check waits for one step (measured: <1 %)


# --------------------------------------------------------------------------- JAX engine
def make_optimizer(recipe: Recipe, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """The recipe's optax optimiser and its learning-rate schedule (a function of the step)."""
    if recipe.milestones:
        sched = optax.piecewise_constant_schedule(
            recipe.lr, {m * steps_per_epoch: recipe.lr_gamma for m in recipe.milestones})
    else:
        sched = optax.constant_schedule(recipe.lr)
    if recipe.optimizer == "adam":
        opt = optax.adam(sched)
    elif recipe.optimizer == "sgd":
        opt = optax.sgd(sched, momentum=recipe.momentum or None)
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}")
    if recipe.weight_decay:  # torch's SGD adds weight_decay * w to the gradient before momentum
        opt = optax.chain(optax.add_decayed_weights(recipe.weight_decay), opt)
    return opt, lr_schedule(recipe, steps_per_epoch)


def data_mesh() -> Mesh:
    """A 1-D mesh over all devices (of every process, when multi-host) with the batch axis 'data'."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Place host values (identical on every process) on all devices of ``sharding``.

    One process: ``device_put``. Several (after ``jax.distributed.initialize``): each process
    contributes its own identical copy (``make_array_from_process_local_data``).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(a: Any) -> jax.Array:
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = jax.make_array_from_process_local_data(sharding, np.asarray(jax.random.key_data(a)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        return jax.make_array_from_process_local_data(sharding, np.asarray(a))

    return jax.tree.map(one, tree)


def local_copy(tree: Any) -> Any:
    """Replicated arrays as this process's own single-device copies (the same thing on one host)."""
    return jax.tree.map(lambda a: a if not isinstance(a, jax.Array) or a.is_fully_addressable
                        else a.addressable_data(0), tree)


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated array as numpy; multi-host, from this process's own copy."""
    return np.asarray(local_copy(x))


def _pad_to(x: np.ndarray, y: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(x)
    total = max(multiple, math.ceil(n / multiple) * multiple)
    mask = np.zeros(total, np.bool_)
    mask[:n] = True
    xp = np.zeros((total, *x.shape[1:]), x.dtype)
    xp[:n] = x
    yp = np.zeros(total, np.int32)
    yp[:n] = y
    return xp, yp, mask


class JaxEngine:
    """Training state and compiled steps of one net in JAX; ``fit`` drives it epoch by epoch.

    The dataset sits on the device(s) as uint8; per epoch one permutation is drawn from
    ``fold_in(key(seed), epoch)``, so an epoch's result depends only on the state at its start
    (which is what makes resuming from an epoch checkpoint bit-exact).
    """

    backend = "jax"
    suffix = ".flax"

    def __init__(self, name: str, splits: Splits, num_classes: int, recipe: Recipe, seed: int):
        self.name, self.recipe, self.seed, self.num_classes = name, recipe, seed, num_classes
        mesh = data_mesh()
        self.devices = mesh.devices.size
        bs = recipe.batch_size
        if bs % self.devices:
            raise ValueError(f"batch size {bs} is not divisible by the {self.devices} devices")
        self.n_train = n_train = len(splits.x_train)
        self.steps, self.examples = epoch_batches(name, n_train, bs)
        steps = self.steps
        repl, batch_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

        self.model = model = flaxnets.create(name, num_classes=num_classes, seed=seed)
        model.train()
        gd_train, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        gd_eval = nnx.split(model, nnx.Param, ...)[0]
        model.train()
        tx, self.lr_at = make_optimizer(recipe, steps)
        self.state = replicate((params, rest), repl)
        self.opt_state = replicate(tx.init(params), repl)
        self.x_dev, self.y_dev = replicate((splits.x_train, splits.y_train.astype(np.int32)), repl)
        self.evals = {}
        for split_name, (xs, ys) in splits.eval_sets().items():
            xp, yp, mp = _pad_to(xs, ys, bs)  # all examples evaluated: pad and mask the tail
            self.evals[split_name] = (replicate((xp, yp, mp), repl), len(xs))

        def train_batch(state, opt_state, x_all, y_all, perm, i, key):
            # the last batch may be partial: perm is padded to whole batches, the mask drops the pad
            idx = jax.lax.dynamic_slice_in_dim(perm, i * bs, bs)
            mask = jnp.arange(bs) < n_train - i * bs
            x, y, mask = (jax.lax.with_sharding_constraint(a, batch_sh)
                          for a in (jnp.take(x_all, idx, axis=0), jnp.take(y_all, idx, axis=0), mask))
            return train_step(gd_train, state, opt_state, x, y, mask, jax.random.fold_in(key, i),
                              tx=tx, recipe=recipe)

        def eval_batch(state, x_all, y_all, m_all, i):
            sl = [jax.lax.with_sharding_constraint(jax.lax.dynamic_slice_in_dim(a, i * bs, bs), batch_sh)
                  for a in (x_all, y_all, m_all)]
            sums, pred = eval_step(gd_eval, state, *sl, recipe=recipe)
            return sums, jax.lax.with_sharding_constraint(pred, repl)  # gathered: every host reads it

        def permutation(key):
            perm = jax.random.permutation(key, n_train).astype(jnp.int32)
            return jnp.pad(perm, (0, max(0, steps * bs - n_train)))

        t0 = time.perf_counter()
        self.key = key = jax.random.key(seed)
        i0 = np.int32(0)
        options = compile_options(name)
        self.perm_fn = jax.jit(permutation).lower(key).compile()
        self.train_fn = (jax.jit(train_batch, donate_argnums=(0, 1))
                         .lower(self.state, self.opt_state, self.x_dev, self.y_dev,
                                self.perm_fn(key), i0, key).compile(options))
        self.eval_fns = {k: jax.jit(eval_batch).lower(self.state, *arrays, i0).compile(options)
                         for k, (arrays, _) in self.evals.items()}  # one per split length
        self.compile_seconds = time.perf_counter() - t0

    def train_epoch(self, epoch: int, progress: Callable[[int, int, int], None] | None = None
                    ) -> np.ndarray:
        """Run one epoch; returns per-step [summed CE loss, correct count], shape (steps, 2)."""
        k_perm, k_aug = jax.random.split(jax.random.fold_in(self.key, epoch))
        perm = self.perm_fn(k_perm)
        state, opt_state = self.state, self.opt_state
        # A Python loop of jitted steps, not lax.scan over the epoch. Re-measured 2026-11-22 on
        # this 2-core CPU (jax 0.10.2, 20 steps, same step function): LeNet batch 256, a scanned
        # epoch took 3.2x as long per step as the loop; ResNet20's scanned epoch had not finished
        # compiling after 20 min. XLA's CPU while-loops are slow; on GPU/TPU scan usually wins.
        # The loop also allows a progress bar and a NaN check between steps.
        sums: list[jax.Array] = []
        checked = 0
        for i in range(self.steps):
            state, opt_state, s = self.train_fn(state, opt_state, self.x_dev, self.y_dev, perm,
                                                np.int32(i), k_aug)
            sums.append(s)
            if progress:
                progress(epoch, i + 1, self.steps)
            if (i + 1) % NAN_CHECK_EVERY == 0 or i + 1 == self.steps:
                losses = to_host(jnp.stack(sums[checked:]))[:, 0]
                bad = first_non_finite(losses)
                if bad is not None:  # the epoch-start state was donated: the engine is spent
                    self.state = self.opt_state = None
                    raise NonFiniteLossError(epoch, checked + bad, epoch * self.steps + checked + bad,
                                             float(losses[bad]))
                checked = i + 1
        self.state, self.opt_state = state, opt_state
        return to_host(jnp.stack(sums))

    def evaluate(self, split: str) -> tuple[float, float, np.ndarray]:
        """(mean loss, accuracy, predictions) on 'val' or 'test' with the current weights."""
        (xe, ye, me), n = self.evals[split]
        sums, preds = [], []
        for i in range(len(me) // self.recipe.batch_size):
            s, p = self.eval_fns[split](self.state, xe, ye, me, np.int32(i))
            sums.append(s)
            preds.append(p)
        tot = to_host(jnp.sum(jnp.stack(sums), axis=0))
        # divided in float64: 7603/10000 in float32 is 0.76029998, below the torch engine's 0.7603
        loss, correct, count = (float(v) for v in tot)
        return loss / count, correct / count, np.concatenate(
            [to_host(p) for p in preds])[:n]

    def get_state(self) -> Any:
        """A copy of the full training state (weights, batch stats, optimiser)."""
        return jax.tree.map(jnp.copy, (self.state, self.opt_state))  # copy: the step donates them

    def set_state(self, snapshot: Any) -> None:
        """Continue from ``snapshot`` (from ``get_state`` or ``load_state``)."""
        self.state, self.opt_state = jax.tree.map(jnp.copy, snapshot)

    def save_state(self, snapshot: Any, path: Path, meta: dict[str, Any]) -> Path:
        """Write ``snapshot`` and ``meta`` as one checkpoint file, atomically."""
        (params, rest), opt_state = local_copy(snapshot)
        self._merge(params, rest)
        return checkpoint.save(path, checkpoint.Checkpoint(
            self.name, self.num_classes, checkpoint.model_to_flat(self.model),
            checkpoint.flatten_tree(opt_state), meta))

    def load_state(self, path: Path) -> tuple[Any, dict[str, Any]]:
        """(snapshot, meta) from a checkpoint written by ``save_state`` for this net."""
        ck = checkpoint.load(path)
        if ck.net != self.name or ck.num_classes != self.num_classes:
            raise checkpoint.CheckpointError(
                f"{path} is a checkpoint of {ck.net!r} with {ck.num_classes} classes, not "
                f"{self.name!r} with {self.num_classes}")
        if ck.train is None:
            raise checkpoint.CheckpointError(f"{path} holds weights only, no training state to resume")
        checkpoint.flat_into_model(self.model, ck.model)
        _, params, rest = nnx.split(self.model, nnx.Param, ...)
        opt_state = checkpoint.unflatten_like(self.opt_state if self.opt_state is not None
                                              else self._opt_template, ck.train, "optimiser state")
        repl = NamedSharding(data_mesh(), P())
        return replicate(((params, rest), opt_state), repl), ck.meta

    @property
    def _opt_template(self) -> Any:
        _, params, _ = nnx.split(self.model, nnx.Param, ...)
        return make_optimizer(self.recipe, self.steps)[0].init(params)

    def _merge(self, params: nnx.State, rest: nnx.State) -> None:
        nnx.update(self.model, params, rest)

    def final_model(self) -> nnx.Module:
        """The nnx model holding the current weights (train mode)."""
        self._merge(*local_copy(self.state))
        self.model.train()
        return self.model

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The current weights as a PyTorch state_dict (numpy arrays, torch layout and names)."""
        from parity.convert import to_numpy_state_dict

        return to_numpy_state_dict(self.final_model())


# --------------------------------------------------------------------------- the epoch loop
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


def make_engine(backend: str, name: str, splits: Splits, num_classes: int, recipe: Recipe,
                seed: int) -> Any:
    """The engine of ``backend`` ('jax' or 'torch') for one run."""
    if backend == "jax":
        return JaxEngine(name, splits, num_classes, recipe, seed)
    if backend == "torch":
        from torch_ref.train import TorchEngine

        return TorchEngine(name, splits, num_classes, recipe, seed)
    raise ValueError(f"unknown backend {backend!r}; expected 'jax' or 'torch'")


def checkpoint_paths(run_dir: str | Path, backend: str) -> dict[str, Path]:
    """{'last': ..., 'best': ...} checkpoint files of a run directory for ``backend``."""
    suffix = JaxEngine.suffix if backend == "jax" else ".pt"
    d = Path(run_dir) / "checkpoints"
    return {"last": d / f"last{suffix}", "best": d / f"best{suffix}"}


def fit(name: str, data: Dataset, recipe: Recipe | None = None, seed: int = 0,
        progress: Callable[[int, int, int], None] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None, *, backend: str = "jax",
        run_dir: str | Path | None = None, resume: bool = False) -> FitResult:
    """Train net ``name`` on ``data`` with ``recipe`` (its family's default if None).

    ``progress(epoch, step, steps)`` is called after each dispatched step and ``on_epoch(row)``
    after each epoch. With ``run_dir`` the last and best training states are written to
    ``run_dir/checkpoints`` after every epoch, and ``resume`` continues from the last one: the
    final metrics equal the uninterrupted run's bit for bit on CPU (same seed, same data).
    A NaN/Inf loss raises NonFiniteLossError; the checkpoints keep the last good epoch.
    """
    recipe = recipe or recipe_for(name)
    check_image_shape(name, data.image_shape)
    splits = make_splits(data, recipe, seed)
    engine = make_engine(backend, name, splits, data.num_classes, recipe, seed)
    validating = splits.x_val is not None
    eval_split = "val" if validating else "test"
    paths = checkpoint_paths(run_dir, backend) if run_dir is not None else None
    writes = paths is not None and jax.process_index() == 0  # multi-host: process 0 writes
    meta_base = {"net": name, "backend": backend, "seed": seed, "num_classes": data.num_classes,
                 "recipe": dataclasses.asdict(recipe)}

    metrics: list[dict[str, Any]] = []
    best_acc, best_epoch, best_state, start = -1.0, 0, None, 0
    if resume:
        if paths is None or not paths["last"].is_file():
            raise FileNotFoundError(f"nothing to resume: no checkpoint {paths and paths['last']}")
        for stale in paths["last"].parent.glob(".*.tmp"):  # left by a crash during a save
            stale.unlink()
        snapshot, meta = engine.load_state(paths["last"])
        _check_resumable(meta, meta_base)
        engine.set_state(snapshot)
        metrics, start = list(meta["metrics"]), int(meta["epoch"])
        best_acc, best_epoch = float(meta["best_val_acc"]), int(meta["best_epoch"])
        if validating and best_epoch:
            best_state = engine.load_state(paths["best"])[0]

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
        if improved or writes:
            snap = engine.get_state()
            best_state = snap if improved else best_state
            if writes:
                meta = dict(meta_base, epoch=epoch + 1, metrics=metrics, best_val_acc=best_acc,
                            best_epoch=best_epoch)
                engine.save_state(snap, paths["last"], meta)
                if improved:
                    engine.save_state(snap, paths["best"], meta)
        if on_epoch:
            on_epoch(row)

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


def _check_resumable(meta: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint made with another net, backend, seed, classes or recipe."""
    for k in ("net", "backend", "seed", "num_classes"):
        if meta.get(k) != now[k]:
            raise ValueError(f"cannot resume: the checkpoint has {k}={meta.get(k)!r}, this run {now[k]!r}")
    old = {k: v for k, v in meta["recipe"].items() if k != "epochs"}
    new = {k: v for k, v in now["recipe"].items() if k != "epochs"}
    old = json.loads(json.dumps(old))  # tuples were saved as lists
    new = json.loads(json.dumps(new))
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        raise ValueError(f"cannot resume: the recipe differs from the checkpoint's: {diff}")


# --------------------------------------------------------------------------- model summary
def model_summary(model: nnx.Module, input_shape: tuple[int, int, int]
                  ) -> tuple[list[tuple[str, str, str, int]], int]:
    """Rows (path, layer type, output shape, params) of the leaf layers, and the total params.

    Output shapes come from one abstract forward pass (jax.eval_shape) in eval mode with the
    leaf layer classes' ``__call__`` temporarily wrapped to record their outputs. ``model`` may
    be abstract (``nnx.eval_shape(lambda: flaxnets.create(name))``), which skips the slow init.
    """
    mods = [(".".join(map(str, p)), m) for p, m in nnx.iter_modules(model)]
    parents = {p.rsplit(".", 1)[0] if "." in p else "" for p, _ in mods if p}
    where: dict[int, str] = {}  # id of a module of the traced copy -> its path

    def forward(state: nnx.State, x: jax.Array) -> jax.Array:
        traced = nnx.merge(graphdef, state)
        where.update({id(m): ".".join(map(str, p)) for p, m in nnx.iter_modules(traced)})
        return traced(x)

    leaf_classes = {type(m) for p, m in mods if p not in parents}
    try:
        model.eval()
        graphdef, state = nnx.split(model)
        with record_outputs(leaf_classes, where) as outputs:
            jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    finally:
        model.train()
    shapes = {p: jax.tree.map(lambda t: tuple(t.shape), out) for p, out in outputs.items()}

    def size(tree: Any) -> int:
        return sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(tree))

    rows = []
    for p, m in mods:
        if p in parents or not p:  # parents: only parameters they hold directly
            own = size([v for v in vars(m).values() if isinstance(v, nnx.Param)])
            if own:
                rows.append((p or "(root)", type(m).__name__, "-", own))
            continue
        rows.append((p, type(m).__name__, str(shapes.get(p, "-")).replace(" ", ""),
                     size(nnx.state(m, nnx.Param))))
    order = {p: i for i, p in enumerate(shapes)}
    rows.sort(key=lambda r: order.get(r[0], len(order)))  # forward-pass order; uncalled last
    return rows, count_params(model)


def format_summary(name: str, rows: list[tuple[str, str, str, int]], total: int) -> str:
    """The summary rows as an aligned text table with a total line."""
    heads = ("layer", "type", "output", "params")
    w = [max(len(h), *(len(f"{r[i]:,}" if i == 3 else r[i]) for r in rows)) for i, h in enumerate(heads)]
    line = lambda r: f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:>{w[3]},}"  # noqa: E731
    head = f"{'layer':<{w[0]}}  {'type':<{w[1]}}  {'output':<{w[2]}}  {'params':>{w[3]}}"
    sep = "-" * len(head)
    return "\n".join([f"model {name}", head, sep, *map(line, rows), sep,
                      f"{'total trainable parameters':<{len(head) - w[3] - 2}}  {total:>{w[3]},}"])


# --------------------------------------------------------------------------- run directories
def write_metrics_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """metrics.csv: one row per epoch, rewritten atomically after each epoch (nothing lost on a crash)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return checkpoint.atomic_write_bytes(path, buf.getvalue().encode())


def write_json(path: str | Path, obj: dict[str, Any]) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return checkpoint.atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def write_run(run_dir: str | Path, config: dict[str, Any], result: FitResult) -> Path:
    """Write the run's results: config.json (with the final metrics), metrics.csv, curves.png,
    confusion_matrix.png, per_class.csv and samples.png (the first 32 test images)."""
    from flaxnets import metrics, plots

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(config, test_loss=result.test_loss, test_acc=result.test_acc,
               compile_seconds=result.compile_seconds, class_names=result.class_names, **result.info)
    write_json(run_dir / "config.json", cfg)
    write_metrics_csv(run_dir / "metrics.csv", result.metrics)
    plots.plot_curves(result.metrics, run_dir / "curves.png", best_epoch=result.info.get("best_epoch"))
    plots.plot_confusion(result.confusion, result.class_names, run_dir / "confusion_matrix.png",
                         title=f"test accuracy {result.test_acc:.4f}")
    metrics.write_per_class(result.confusion, result.class_names, run_dir / "per_class.csv")
    n = min(32, len(result.test_preds))
    plots.plot_samples(result.test_images[:n], result.test_labels[:n], result.test_preds[:n],
                       result.class_names, run_dir / "samples.png", n=n)
    return run_dir
