"""torch_ref: the reference material's PyTorch definitions (defects corrected, names kept)."""

from __future__ import annotations

from typing import Any

from flaxnets.registry import list_nets, model_class

__all__ = ["create", "list_nets"]


def create(name: str, num_classes: int | None = None, **kw: Any):
    """Build the torch model ``name`` (registry default class count if ``num_classes`` is None).

    Initialisation is the material's own (torch defaults, kaiming-normal where the note uses it);
    seed it with ``torch.manual_seed`` beforehand for reproducible weights.
    """
    cls, kwargs, spec = model_class("torch_ref", name)
    kwargs.update(kw)
    return cls(num_classes=spec.num_classes if num_classes is None else num_classes, **kwargs)
