"""The model summary table printed before training: one row per leaf layer (no framework
import; ``flaxnets.introspect.model_summary`` and ``torch_ref.introspect.model_summary`` make
the rows)."""

from __future__ import annotations

import math
import re

SummaryRow = tuple[str, str, str, int]  # (path, layer type, output shape, parameters)


def format_summary(name: str, rows: list[SummaryRow], total: int) -> str:
    """The summary rows as an aligned text table with a total line."""
    heads = ("layer", "type", "output", "params")
    w = [max(len(h), *(len(f"{r[i]:,}" if i == 3 else r[i]) for r in rows)) for i, h in enumerate(heads)]
    line = lambda r: f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:>{w[3]},}"  # noqa: E731
    head = f"{'layer':<{w[0]}}  {'type':<{w[1]}}  {'output':<{w[2]}}  {'params':>{w[3]}}"
    sep = "-" * len(head)
    return "\n".join([f"model {name}", head, sep, *map(line, rows), sep,
                      f"{'total trainable parameters':<{len(head) - w[3] - 2}}  {total:>{w[3]},}"])


def activation_elements(rows: list[SummaryRow]) -> int:
    """Values the leaf layers output for one example: the activations a training step keeps
    for its backward pass (shapes such as ``(1,6,24,24)``; nested tuples for several outputs)."""
    return sum(math.prod(int(d) for d in dims.split(",")[1:] if d)
               for _, _, shape, _ in rows for dims in re.findall(r"\(([\d,]+)\)", shape))
