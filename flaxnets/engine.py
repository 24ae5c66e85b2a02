"""The JAX training engine: jitted, donated Optax steps over explicit state.

The NNX model is split once into (graphdef, params, rest); the steps are pure functions of them.
The dataset sits on the device(s) as uint8 and is normalised and augmented inside the step.
Batches are sharded along a 'data' mesh axis with parameters replicated, so the same engine
runs on one device or several, on one host or many.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
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
from flaxnets.fit import (NAN_CHECK_EVERY, NonFiniteLossError, Splits, epoch_batches, epoch_permutation,
                          first_non_finite, lr_schedule)
from flaxnets.layers import set_compute_dtype
from flaxnets.recipes import IMAGENET_MEAN, IMAGENET_STD, Recipe
from flaxnets.xla_cpu import compile_options


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


def as_loss_dtype(logits: jax.Array) -> jax.Array:
    """Logits of a bf16 model in fp32 for the loss and its softmax; fp32 and fp64 ones as they are."""
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


COMPUTE_DTYPES = {"fp32": None, "bf16": jnp.bfloat16}  # Recipe.precision -> the layers' dtype


def create_model(name: str, num_classes: int, seed: int, precision: str = "fp32") -> nnx.Module:
    """Net ``name`` initialised from ``seed``, computing in ``precision`` (``Recipe.precision``)."""
    model = flaxnets.create(name, num_classes=num_classes, seed=seed)
    if COMPUTE_DTYPES[precision] is not None:
        set_compute_dtype(model, COMPUTE_DTYPES[precision])
    return model


def train_step(graphdef: nnx.GraphDef, state: tuple[nnx.State, nnx.State], opt_state: Any,
               x_uint8: jax.Array, y: jax.Array, mask: jax.Array, rng: jax.Array, *,
               tx: optax.GradientTransformation, recipe: Recipe) -> tuple[Any, Any, jax.Array]:
    """One optimiser step on the examples ``mask`` keeps (a padded partial batch keeps fewer);
    returns (state, opt_state, [summed CE loss, correct count])."""
    return update_step(graphdef, state, opt_state, preprocess(x_uint8, recipe, rng), y, mask,
                       tx=tx, recipe=recipe)


def update_step(graphdef: nnx.GraphDef, state: tuple[nnx.State, nnx.State], opt_state: Any,
                x: jax.Array, y: jax.Array, mask: jax.Array, *,
                tx: optax.GradientTransformation, recipe: Recipe) -> tuple[Any, Any, jax.Array]:
    """``train_step`` on a model-ready batch ``x`` (preprocessed and augmented; any float dtype,
    so the training parity check runs it in float64)."""
    params, rest = state
    m = mask.astype(x.dtype)
    count = jnp.sum(m)

    def loss_fn(p: nnx.State, rest: nnx.State) -> tuple[jax.Array, tuple[jax.Array, jax.Array, nnx.State]]:
        # copy=True: fresh Variables at this (grad) trace level, so BatchNorm may update them
        model = nnx.merge(graphdef, p, rest, copy=True)
        logits = as_loss_dtype(model(x))
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
    logits = as_loss_dtype(model(preprocess(x_uint8, recipe)))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    pred = jnp.argmax(logits, -1)
    m = mask.astype(jnp.float32)
    return jnp.stack([jnp.sum(ce * m), jnp.sum((pred == y) * m), jnp.sum(m)]), pred


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


def state_template(model: nnx.Module, recipe: Recipe, steps_per_epoch: int) -> Any:
    """A training-state snapshot ((params, rest), opt_state) of ``model`` with the recipe's
    freshly initialised optimiser, unplaced: the shapes, dtypes and names a checkpoint holds."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return (params, rest), make_optimizer(recipe, steps_per_epoch)[0].init(params)


def state_as_dict(snapshot: Any) -> dict[str, Any]:
    """The checkpoint's layout of a snapshot: {'model': the model's nested dict of params and
    other state (``nnx.to_pure_dict``'s names), 'opt': the optimiser state's}."""
    (params, rest), opt_state = snapshot
    return {"model": checkpoint.as_dict(params, rest), "opt": checkpoint.as_dict(opt_state)}


def load_train_state(path: Path, name: str, num_classes: int, template: Any) -> tuple[Any, dict[str, Any]]:
    """(snapshot, meta) of the JAX training checkpoint ``path`` of net ``name``, shaped and placed
    as ``template`` (``state_template``, placed or not); refuses another net or class count."""
    step, meta = checkpoint.read_meta(path)
    if meta.get("net") != name or meta.get("num_classes") != num_classes:
        raise checkpoint.CheckpointError(
            f"{path} is a checkpoint of {meta.get('net')!r} with {meta.get('num_classes')} "
            f"classes, not {name!r} with {num_classes}")
    tree, meta = checkpoint.load(path, state_as_dict(template), step=step)
    (params, rest), opt_state = template
    return ((checkpoint.from_dict(params, tree["model"]), checkpoint.from_dict(rest, tree["model"])),
            checkpoint.from_dict(opt_state, tree["opt"])), meta


class JaxEngine:
    """Training state and compiled steps of one net in JAX; ``fit`` drives it epoch by epoch.

    The dataset sits on the device(s) as uint8; an epoch's order is ``epoch_permutation(seed,
    epoch)`` (drawn on the host, the torch engine's too) and its augmentation is drawn from
    ``fold_in(key(seed), epoch)``, so an epoch's result depends only on the state at its start
    (which is what makes resuming from an epoch checkpoint bit-exact).
    """

    backend = "jax"

    def __init__(self, name: str, splits: Splits, num_classes: int, recipe: Recipe, seed: int):
        self.name, self.recipe, self.seed, self.num_classes = name, recipe, seed, num_classes
        mesh = data_mesh()
        self.devices = mesh.devices.size
        self.writes_files = jax.process_index() == 0  # multi-host: process 0 writes the run
        bs = recipe.batch_size
        if bs % self.devices:
            raise ValueError(f"batch size {bs} is not divisible by the {self.devices} devices")
        self.n_train = n_train = len(splits.x_train)
        self.steps, self.examples = epoch_batches(name, n_train, bs)
        steps = self.steps
        repl, batch_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

        self.model = model = create_model(name, num_classes, seed, recipe.precision)
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

        t0 = time.perf_counter()
        self.key = key = jax.random.key(seed)
        self._repl = repl
        i0 = np.int32(0)
        options = compile_options(name, jax.default_backend())
        self.train_fn = (jax.jit(train_batch, donate_argnums=(0, 1))
                         .lower(self.state, self.opt_state, self.x_dev, self.y_dev,
                                self.permutation(0), i0, key).compile(options))
        self.eval_fns = {k: jax.jit(eval_batch).lower(self.state, *arrays, i0).compile(options)
                         for k, (arrays, _) in self.evals.items()}  # one per split length
        self.compile_seconds = time.perf_counter() - t0

    def permutation(self, epoch: int) -> jax.Array:
        """Epoch ``epoch``'s example order as the step takes it: int32 on the devices, padded
        with zeros to whole batches (the step's mask drops the padding)."""
        perm = epoch_permutation(self.seed, epoch, self.n_train).astype(np.int32)
        return replicate(np.pad(perm, (0, max(0, self.steps * self.recipe.batch_size - self.n_train))),
                         self._repl)

    def train_epoch(self, epoch: int, progress: Callable[[int, int, int], None] | None = None
                    ) -> np.ndarray:
        """Run one epoch; returns per-step [summed CE loss, correct count], shape (steps, 2)."""
        k_aug = jax.random.split(jax.random.fold_in(self.key, epoch))[1]  # [0] drew the order once
        perm = self.permutation(epoch)
        state, opt_state = self.state, self.opt_state
        # A Python loop of jitted steps, not lax.scan over the epoch. Measured on the 2-core CPU
        # (jax 0.10.2, 20 steps, same step function): LeNet batch 256, a scanned
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
        """Write ``snapshot`` and ``meta`` as step ``meta['epoch']`` of the orbax checkpoint
        directory ``path`` (``flaxnets.checkpoint``). Collective: every process calls it."""
        meta = dict(meta, net=self.name, num_classes=self.num_classes)
        return checkpoint.save(path, state_as_dict(snapshot), meta, step=int(meta.get("epoch", 0)))

    @staticmethod
    def has_state(path: Path) -> bool:
        """Whether ``path`` holds a checkpoint to resume from."""
        return checkpoint.exists(path)

    def load_state(self, path: Path) -> tuple[Any, dict[str, Any]]:
        """(snapshot, meta) from a checkpoint written by ``save_state`` for this net, placed on
        the devices as the engine's state (every process calls it)."""
        return load_train_state(path, self.name, self.num_classes, self._template())

    def _template(self) -> Any:
        """A snapshot shaped and placed as the engine's state (that state while it exists)."""
        if self.state is not None and self.opt_state is not None:
            return self.state, self.opt_state
        return self.place(state_template(self.model, self.recipe, self.steps))

    def place(self, snapshot: Any) -> Any:
        """A snapshot of host or single-device arrays placed as the engine's state (replicated)."""
        return replicate(snapshot, NamedSharding(data_mesh(), P()))

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
