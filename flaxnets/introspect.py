"""Record what each submodule of an NNX model returns, by module path (summaries, parity reports)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxnets.layers import unrolled_stacks
from flaxnets.summary import SummaryRow


@contextlib.contextmanager
def record_outputs(classes: Iterable[type], paths: Mapping[int, str]) -> Iterator[OrderedDict[str, Any]]:
    """While active, a call of any module of ``classes`` whose ``id`` is in ``paths`` stores its
    output under that path, in completion order (a later call of the same module replaces it).

    NNX has no forward hooks, so ``__call__`` of those classes is wrapped for the duration of
    the block and restored after. ``paths`` may be filled inside the block (a traced copy's ids).
    """
    captured: OrderedDict[str, Any] = OrderedDict()
    saved = [(c, c.__dict__.get("__call__")) for c in set(classes)]

    def wrap(orig):
        def call(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            path = paths.get(id(self))
            if path is not None:
                captured.pop(path, None)  # a subclass's super().__call__ is replaced by its own
                captured[path] = out
            return out

        return call

    try:
        for c, _ in saved:
            c.__call__ = wrap(c.__call__)
        # scanned blocks run one by one: inside a scan their outputs are tracers of the loop body
        with unrolled_stacks():
            yield captured
    finally:
        for c, own in saved:
            if own is None:
                del c.__call__
            else:
                c.__call__ = own


def count_params(model: nnx.Module) -> int:
    """Trainable parameters of a Flax model (its ``nnx.Param`` leaves); works on abstract models."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def model_summary(model: nnx.Module, input_shape: tuple[int, int, int]
                  ) -> tuple[list[SummaryRow], int]:
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


def state_bytes(model: Any, optimizer_slots: int) -> int:
    """Bytes of one training checkpoint of ``model`` (may be abstract): weights + optimiser slots."""
    n = sum(v.size for v in jax.tree.leaves(nnx.state(model)))
    return 4 * n * (1 + optimizer_slots)
