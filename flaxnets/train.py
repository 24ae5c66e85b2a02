"""Training recipes (one per net family) and the JAX training engine, run writing and summaries.

The engine splits the NNX model once into (graphdef, params, rest) and runs pure, jitted steps
with donated state; the dataset sits on the device as uint8 and is normalised/augmented inside
the step. Batches are sharded along a 'data' mesh axis (params replicated), so it scales to
several devices and still runs on one.
"""

from __future__ import annotations

import csv
import dataclasses
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
from flaxnets.data import Dataset
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
               x_uint8: jax.Array, y: jax.Array, rng: jax.Array, *,
               tx: optax.GradientTransformation, recipe: Recipe) -> tuple[Any, Any, jax.Array]:
    """One optimiser step; returns (state, opt_state, [summed CE loss, correct count])."""
    params, rest = state
    x = preprocess(x_uint8, recipe, rng)

    def loss_fn(p: nnx.State, rest: nnx.State) -> tuple[jax.Array, tuple[jax.Array, jax.Array, nnx.State]]:
        # copy=True: fresh Variables at this (grad) trace level, so BatchNorm may update them
        model = nnx.merge(graphdef, p, rest, copy=True)
        logits = model(x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss = ce
        if recipe.l2:
            loss = loss + recipe.l2 * sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(p))
        return loss, (ce, logits, nnx.split(model, nnx.Param, ...)[2])

    (_, (ce, logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == y)
    return (params, new_rest), opt_state, jnp.stack([ce * y.shape[0], correct.astype(jnp.float32)])


def eval_step(graphdef: nnx.GraphDef, state: tuple[nnx.State, nnx.State], x_uint8: jax.Array,
              y: jax.Array, mask: jax.Array, *, recipe: Recipe) -> tuple[jax.Array, jax.Array]:
    """Masked sums [CE loss, correct, count] and the predictions of one (padded) eval batch."""
    model = nnx.merge(graphdef, *state)
    logits = model(preprocess(x_uint8, recipe))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    pred = jnp.argmax(logits, -1)
    m = mask.astype(jnp.float32)
    return jnp.stack([jnp.sum(ce * m), jnp.sum((pred == y) * m), jnp.sum(m)]), pred


# --------------------------------------------------------------------------- engine
@dataclass
class FitResult:
    """What ``fit`` returns: per-epoch metrics, final test metrics and the trained model."""

    metrics: list[dict[str, Any]]
    test_loss: float
    test_acc: float
    confusion: np.ndarray  # (classes, classes): rows true label, columns prediction
    class_names: list[str]
    eval_split: str  # 'val' or 'test': what the per-epoch eval columns measure
    model: nnx.Module
    compile_seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def split_arrays(x: np.ndarray, y: np.ndarray, fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random (1-fraction, fraction) split of (x, y), reproducible from ``seed``."""
    perm = np.random.default_rng(seed).permutation(len(x))
    n_hold = int(round(len(x) * fraction))
    if n_hold == 0 or n_hold == len(x):
        raise ValueError(f"cannot split {len(x)} examples {1 - fraction:.0%}/{fraction:.0%}")
    keep, hold = perm[n_hold:], perm[:n_hold]
    return x[keep], y[keep], x[hold], y[hold]


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
    if recipe.weight_decay:
        opt = optax.chain(optax.add_decayed_weights(recipe.weight_decay), opt)
    def lr_at(step: int) -> float:  # in Python, so metrics show 0.1 rather than float32 0.10000000149
        return recipe.lr * recipe.lr_gamma ** sum(step >= m * steps_per_epoch for m in recipe.milestones)

    return opt, lr_at


def data_mesh() -> Mesh:
    """A 1-D mesh over all devices with the batch axis 'data'."""
    return Mesh(np.asarray(jax.devices()), ("data",))


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


def fit(name: str, data: Dataset, recipe: Recipe | None = None, seed: int = 0,
        progress: Callable[[int, int, int], None] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """Train net ``name`` on ``data`` with ``recipe`` (its family's default if None).

    ``progress(epoch, step, steps)`` is called after each dispatched step and
    ``on_epoch(row)`` after each epoch. Same seed and data give bit-identical metrics on CPU.
    """
    recipe = recipe or recipe_for(name)
    check_image_shape(name, data.image_shape)
    x_tr, y_tr, x_te, y_te = data.x_train, data.y_train, data.x_test, data.y_test
    if len(x_te) == 0:
        if not recipe.test_fraction:
            raise ValueError("the dataset has no test set and the recipe has no test_fraction")
        x_tr, y_tr, x_te, y_te = split_arrays(x_tr, y_tr, recipe.test_fraction, seed)
    x_val = y_val = None
    if recipe.val_fraction:
        x_tr, y_tr, x_val, y_val = split_arrays(x_tr, y_tr, recipe.val_fraction, seed + 1)

    mesh = data_mesh()
    n_dev = mesh.devices.size
    bs = recipe.batch_size
    if bs % n_dev:
        raise ValueError(f"batch size {bs} is not divisible by the {n_dev} devices")
    steps = len(x_tr) // bs  # the last partial batch is dropped: fixed shapes, one compile
    if steps == 0:
        raise ValueError(f"{len(x_tr)} training examples are fewer than one batch of {bs}")
    repl, batch_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    model = flaxnets.create(name, num_classes=data.num_classes, seed=seed)
    model.train()
    gd_train, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    gd_eval = nnx.split(model, nnx.Param, ...)[0]
    tx, lr_at = make_optimizer(recipe, steps)
    state = jax.device_put((params, rest), repl)
    opt_state = jax.device_put(tx.init(params), repl)

    x_dev, y_dev = jax.device_put((x_tr, y_tr.astype(np.int32)), repl)
    evals = {}
    for split_name, xs, ys in (("val", x_val, y_val), ("test", x_te, y_te)):
        if xs is not None:
            xp, yp, mp = _pad_to(xs, ys, bs)  # all examples evaluated: pad and mask the tail
            evals[split_name] = (jax.device_put((xp, yp, mp), repl), len(xs))

    def train_batch(state, opt_state, x_all, y_all, perm, i, key):
        idx = jax.lax.dynamic_slice_in_dim(perm, i * bs, bs)
        x = jax.lax.with_sharding_constraint(jnp.take(x_all, idx, axis=0), batch_sh)
        y = jax.lax.with_sharding_constraint(jnp.take(y_all, idx, axis=0), batch_sh)
        return train_step(gd_train, state, opt_state, x, y, jax.random.fold_in(key, i),
                          tx=tx, recipe=recipe)

    def eval_batch(state, x_all, y_all, m_all, i):
        sl = [jax.lax.with_sharding_constraint(jax.lax.dynamic_slice_in_dim(a, i * bs, bs), batch_sh)
              for a in (x_all, y_all, m_all)]
        return eval_step(gd_eval, state, *sl, recipe=recipe)

    def permutation(key):
        return jax.random.permutation(key, len(x_tr)).astype(jnp.int32)

    t0 = time.perf_counter()
    key = jax.random.key(seed)
    i0 = np.int32(0)
    perm_fn = jax.jit(permutation).lower(key).compile()
    train_fn = (jax.jit(train_batch, donate_argnums=(0, 1))
                .lower(state, opt_state, x_dev, y_dev, perm_fn(key), i0, key).compile())
    eval_fns = {k: jax.jit(eval_batch).lower(state, *arrays, i0).compile()  # one per split length
                for k, (arrays, _) in evals.items()}
    compile_s = time.perf_counter() - t0

    def evaluate(st, split_name: str) -> tuple[float, float, np.ndarray, np.ndarray]:
        (xe, ye, me), n = evals[split_name]
        sums, preds = [], []
        for i in range(len(me) // bs):
            s, p = eval_fns[split_name](st, xe, ye, me, np.int32(i))
            sums.append(s)
            preds.append(p)
        tot = np.asarray(jnp.sum(jnp.stack(sums), axis=0))
        return float(tot[0] / tot[2]), float(tot[1] / tot[2]), np.concatenate(
            [np.asarray(p) for p in preds])[:n], np.asarray(ye)[:n]

    eval_split = "val" if "val" in evals else "test"
    metrics: list[dict[str, Any]] = []
    best = (-1.0, None)
    for epoch in range(recipe.epochs):
        t_ep = time.perf_counter()
        lr = lr_at(epoch * steps)
        k_perm, k_aug = jax.random.split(jax.random.fold_in(key, epoch))
        perm = perm_fn(k_perm)
        # A Python loop of jitted steps, not lax.scan over the epoch: on this 2-core CPU the loop
        # measured ~3x faster per step than a scanned epoch, and it allows a progress bar.
        step_sums = []
        for i in range(steps):
            state, opt_state, s = train_fn(state, opt_state, x_dev, y_dev, perm, np.int32(i), k_aug)
            step_sums.append(s)
            if progress:
                progress(epoch, i + 1, steps)
        tot = np.asarray(jnp.sum(jnp.stack(step_sums), axis=0))  # waits for the epoch to finish
        train_s = time.perf_counter() - t_ep
        ev_loss, ev_acc, _, _ = evaluate(state, eval_split)
        row = {"epoch": epoch + 1, "lr": lr,
               "train_loss": float(tot[0] / (steps * bs)), "train_acc": float(tot[1] / (steps * bs)),
               f"{eval_split}_loss": ev_loss, f"{eval_split}_acc": ev_acc,
               "images_per_s": steps * bs / train_s, "seconds": time.perf_counter() - t_ep}
        metrics.append(row)
        if on_epoch:
            on_epoch(row)
        if eval_split == "val" and ev_acc > best[0]:
            best = (ev_acc, jax.tree.map(jnp.copy, state))  # copy: `state` is donated next step

    if eval_split == "val" and best[1] is not None:
        state = best[1]
    test_loss, test_acc, preds, labels = evaluate(state, "test")
    k = data.num_classes
    confusion = np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
    nnx.update(model, *state)
    model.train()
    info = {"train_examples": len(x_tr), "val_examples": 0 if x_val is None else len(x_val),
            "test_examples": len(x_te), "steps_per_epoch": steps, "devices": n_dev,
            "best_val_acc": best[0] if eval_split == "val" else None}
    return FitResult(metrics, test_loss, test_acc, confusion, list(data.class_names), eval_split,
                     model, compile_s, info)


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
def write_run(run_dir: str | Path, config: dict[str, Any], result: FitResult) -> Path:
    """Write config.json, metrics.csv, curves.png and confusion_matrix.png into ``run_dir``."""
    from flaxnets import plots

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(config, test_loss=result.test_loss, test_acc=result.test_acc,
               compile_seconds=result.compile_seconds, class_names=result.class_names, **result.info)
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result.metrics[0]))
        w.writeheader()
        w.writerows(result.metrics)
    plots.plot_curves(result.metrics, run_dir / "curves.png", eval_split=result.eval_split)
    plots.plot_confusion(result.confusion, result.class_names, run_dir / "confusion_matrix.png",
                         title=f"test accuracy {result.test_acc:.4f}")
    return run_dir
