"""The one switch over the speed-ups: each gives the same function as what it replaces, and
``without`` turns some off (read when a step is traced), so that a benchmark can measure each
against its absence in one process (``scripts/bench.py --without``). Trace-time settings are
stacks, so blocks nest."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

SPEEDUPS = {
    "scanned_stages": "identical blocks of a BlockStack run as one lax.scan (any backend)",
    "sliced_kernel_grads": "CPU: conv kernel gradients summed over L2-sized slices of the batch",
    "tap_sum_convs": "CPU: stride-1 convs of at most 3 input channels as a sum of shifted inputs",
    "tiled_pools": "CPU: non-overlapping pools as a reshape and a reduction",
    "cpu_compile_options": "CPU: per-net XLA compile options measured faster (compile_options.py)",
    "col2im_input_grads": "CPU: input gradients of stride-1 convs of at most 8 input channels or"
                          " 8x8 outputs as a matrix product and a sum of shifted blocks",
    "pointwise_dots": "CPU: unpadded 1x1 convs as a matrix product over channels",
    "plain_kernel_grads": "CPU: kernel gradients of stride-1 convs of 4-32 input channels as a plain"
                          " conv with the images as its features",
    "batch_norm_grads": "CPU: the training-mode BatchNorm backward of 32 or more channels written out"
                        " (two reductions and one elementwise pass)",
    "unrolled_stages": "CPU with oneDNN convs: stages of at most 17 identical blocks run unrolled, not"
                       " scanned (stages.py)",
    "onednn_convs": "CPU: f32 NHWC convs (forward and both gradients) as XLA FFI custom calls into oneDNN"
                    " (onednn.py; XLA's own where the library is not built)",
}
# speed-ups a variable turns off for the whole process where it is 'off': onednn_convs
# (FLAXNETS_ONEDNN_CONVS), the one that runs code of another library (docs/cpu_speedups.md#onednn_convs)
OPT_OUT = {"onednn_convs": "FLAXNETS_ONEDNN_CONVS"}
_off: list[frozenset[str]] = [frozenset(n for n, var in OPT_OUT.items() if os.environ.get(var) == "off")]


@contextlib.contextmanager
def _pushed(stack: list[Any], value: Any) -> Iterator[None]:
    """Give a trace-time setting (a stack, so blocks nest) ``value`` for the duration of the block."""
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def _known(names: tuple[str, ...]) -> set[str]:
    unknown = [n for n in names if n not in SPEEDUPS]
    if unknown:
        raise ValueError(f"unknown speed-up {unknown[0]!r}; valid: {', '.join(SPEEDUPS)}")
    return set(names)


@contextlib.contextmanager
def without(*names: str) -> Iterator[None]:
    """Within the block, models trace without the named ``SPEEDUPS``."""
    with _pushed(_off, _off[-1] | _known(names)):
        yield


@contextlib.contextmanager
def using(*names: str) -> Iterator[None]:
    """Within the block, models trace with the named ``SPEEDUPS``, even those turned off outside it."""
    with _pushed(_off, _off[-1] - _known(names)):
        yield


def speedup_on(name: str) -> bool:
    """Whether the speed-up ``name`` applies to what is traced or compiled now (see ``without``)."""
    return name not in _off[-1]


_loop = [False]  # True while a BlockStack traces its scanned block


def loop_body() -> contextlib.AbstractContextManager[None]:
    """Within the block, what is traced is the body of a loop (``BlockStack``'s scan): convs take
    the forms XLA:CPU runs well inside loop bodies (``conv._loop_conv``)."""
    return _pushed(_loop, True)


def in_loop_body() -> bool:
    """Whether a loop body is being traced now (see ``loop_body``)."""
    return _loop[-1]
