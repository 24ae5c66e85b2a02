"""One conv's forward and both gradients, alone: oneDNN through XLA FFI (each layout) against the
project's XLA forms and torch channels-last eager (docs/cpu_speedups.md#onednn_convs).

``python -m benchmarks.onednn_convs [--rounds 2]`` prints, per conv, the best of the rounds'
median times in ms; the variants are interleaved within each round.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from flaxnets import xla_cpu
from flaxnets.xla_cpu import onednn, switch
from flaxnets.xla_cpu.compile_options import CPU_COMPILE_OPTIONS
from flaxnets.xla_cpu.conv import _NHWC

# (in channels, out channels, side, stride) of 3x3 convs at batch 128: the CIFAR ResNets' stages
CONVS = [(16, 16, 32, 1), (32, 32, 16, 1), (64, 64, 8, 1), (16, 32, 32, 2), (32, 64, 16, 2)]
BATCH = 128


def _median_ms(f: Callable[[], object], reps: int = 15) -> float:
    """The median wall time of ``f`` in ms after two untimed calls."""
    f(), f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def _jax_step(x: jax.Array, k: jax.Array, stride: int, onednn_layout: int | None) -> Callable[[], object]:
    """The compiled forward + both gradients of one conv: through oneDNN with that layout, or
    (None) the project's XLA forms with the ResNets' compile options."""
    pads = ((1, 1), (1, 1))

    def loss(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.sum(xla_cpu.conv_general_dilated(a, b, (stride, stride), pads, dimension_numbers=_NHWC) ** 2)

    saved = onednn.LAYOUT
    onednn.LAYOUT = saved if onednn_layout is None else onednn_layout
    try:
        with switch.without("onednn_convs") if onednn_layout is None else switch.using("onednn_convs"):
            step = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, k).compile(
                {} if onednn_layout is not None else CPU_COMPILE_OPTIONS["resnet20"])
    finally:
        onednn.LAYOUT = saved
    return lambda: jax.block_until_ready(step(x, k))


def _torch_step(x: np.ndarray, k: np.ndarray, stride: int) -> Callable[[], object]:
    """Torch channels-last eager: the conv, a sum of squares and its backward."""
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    tk = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last).requires_grad_()

    def step() -> None:
        tx.grad = tk.grad = None
        (torch.nn.functional.conv2d(tx, tk, stride=stride, padding=1) ** 2).sum().backward()
    return step


def main() -> None:
    """Time every conv of CONVS in every variant and print one line per conv."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not onednn.available():
        raise SystemExit("the oneDNN extension is not built (python -m flaxnets.xla_cpu.onednn_build)")
    print(f"oneDNN {onednn.version()}, torch threads {torch.get_num_threads()}, batch {BATCH}, 3x3, ms:"
          " forward + both gradients")
    for ci, co, side, stride in CONVS:
        rng = np.random.default_rng(0)
        xn = rng.standard_normal((BATCH, side, side, ci), np.float32)
        kn = (rng.standard_normal((3, 3, ci, co)) * 0.1).astype(np.float32)
        x, k = jnp.asarray(xn), jnp.asarray(kn)
        variants = {"XLA (project)": _jax_step(x, k, stride, None),
                    **{f"oneDNN layout {n}": _jax_step(x, k, stride, n) for n in (0, 1, 2)},
                    "torch-CL": _torch_step(xn, kn, stride)}
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, f in variants.items():
                times.setdefault(name, []).append(_median_ms(f))
        print(f"{ci}->{co} on {side}x{side} stride {stride}: "
              + ", ".join(f"{name} {min(t):.1f}" for name, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
