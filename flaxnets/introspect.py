"""Record what each submodule of an NNX model returns, by module path (summaries, parity reports)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
from flax import nnx

from flaxnets.layers import unrolled_stacks


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
