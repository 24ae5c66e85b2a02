"""torch_ref: the reference material's PyTorch definitions (defects corrected, names kept)."""

from __future__ import annotations

from typing import Any

from flaxnets.registry import constructor, list_nets

__all__ = ["create", "list_nets"]


def create(name: str, num_classes: int | None = None, **kw: Any):
    """Build the torch model ``name`` (registry default class count if ``num_classes`` is None).

    Initialisation is the material's own (torch defaults, kaiming-normal where the note uses it);
    seed it with ``torch.manual_seed`` beforehand for reproducible weights. A bad argument is one
    TypeError or ValueError naming it, as for ``flaxnets.create``.
    """
    cls, kwargs = constructor("torch_ref", name, num_classes, kw)
    return cls(**kwargs)
