"""FLOPs of a net's training step, and the machine's FP32 matmul peak to compare them with."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

TRAIN_OVER_FORWARD = 3  # backward ~ 2x forward (gradients of inputs and of weights)


def forward_flops(net: str, input_shape: tuple[int, int, int]) -> int:
    """FLOPs (2 per multiply-add) of one image's forward pass through the conv and linear layers.

    Counted from the layer shapes seen by forward hooks on the torch twin; normalisation,
    activations, pooling and bias additions are left out (a few percent at most).
    """
    import torch

    import torch_ref

    model = torch_ref.create(net).eval()
    macs = [0]

    def hook(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, torch.nn.Conv2d):  # per output element: (C_in / groups) * kh * kw
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            k = mod.in_features
        macs[0] += out[0].numel() * k

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    h, w, c = input_shape
    try:
        with torch.inference_mode():
            model(torch.zeros(1, c, h, w))
    finally:
        for hk in hooks:
            hk.remove()
    return 2 * macs[0]


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Measured FP32 (n x n) @ (n x n) FLOP/s of JAX and torch, interleaved; the larger is the peak."""
    import jax
    import jax.numpy as jnp
    import torch

    a = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a[0]), jnp.asarray(a[1])
    ta, tb = torch.from_numpy(a[0]), torch.from_numpy(a[1])
    jmm = jax.jit(jnp.matmul)
    runs = {"jax": lambda: jmm(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeats + 1):  # the first round warms up (compilation, thread pools)
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if i:
                seconds[k].append(time.perf_counter() - t0)
    flop = 2 * n**3
    out: dict[str, Any] = {"n": n, "flop_per_matmul": flop}
    for k, s in seconds.items():
        out[k] = {"seconds": s, "flops": flop / statistics.median(s)}
    out["peak_flops"] = max(out[k]["flops"] for k in runs)
    out["peak_from"] = max(runs, key=lambda k: out[k]["flops"])
    return out
