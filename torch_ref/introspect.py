"""The model summary rows of a torch_ref net (forward hooks), as ``flaxnets.summary`` prints them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flaxnets.summary import SummaryRow


def model_summary(model: torch.nn.Module, input_shape: tuple[int, int, int]
                  ) -> tuple[list[SummaryRow], int]:
    """Rows (path, layer type, output shape NCHW, params) of the leaf layers, and the total params.

    The torch counterpart of ``flaxnets.introspect.model_summary`` (same rows, printed by the
    same ``flaxnets.summary.format_summary``): output shapes from forward hooks during one eval-mode call on zeros.
    """
    leaves = [(p, m) for p, m in model.named_modules() if p and not any(True for _ in m.children())]
    shapes: dict[str, str] = {}
    def record(path: str) -> Callable[..., None]:
        def hook(mod: torch.nn.Module, inp: Any, out: torch.Tensor) -> None:  # None: output kept
            shapes.setdefault(path, str(tuple(out.shape)).replace(" ", ""))
        return hook

    hooks = [m.register_forward_hook(record(p)) for p, m in leaves]
    h, w, c = input_shape
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, c, h, w))
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    rows = [(p, type(m).__name__, shapes.get(p, "-"), sum(t.numel() for t in m.parameters()))
            for p, m in leaves]
    order = {p: i for i, p in enumerate(shapes)}
    rows.sort(key=lambda r: order.get(r[0], len(order)))  # forward-pass order; uncalled last
    return rows, sum(t.numel() for t in model.parameters() if t.requires_grad)
