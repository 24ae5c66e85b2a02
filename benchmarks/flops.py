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


def matmul_peak(n: int = 2048, repeats: int = 5, precision: str = "fp32", device: str = "cpu"
                ) -> dict[str, Any]:
    """Measured (n x n) @ (n x n) FLOP/s of JAX (its default device) and torch (on ``device``) in
    ``precision`` ('fp32': each framework's default float32 matmul, or 'bf16'), interleaved,
    medians; the larger is the peak."""
    import jax
    import jax.numpy as jnp
    import torch

    a = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    jdt, tdt = (jnp.float32, torch.float32) if precision == "fp32" else (jnp.bfloat16, torch.bfloat16)
    ja, jb = (jnp.asarray(m, jdt) for m in a)
    ta, tb = (torch.from_numpy(m).to(device, tdt) for m in a)
    jmm = jax.jit(jnp.matmul)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def torch_mm() -> None:
        torch.mm(ta, tb)
        sync()

    runs = {"jax": lambda: jmm(ja, jb).block_until_ready(), "torch": torch_mm}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeats + 1):  # the first round warms up (compilation, thread pools, cuBLAS)
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if i:
                seconds[k].append(time.perf_counter() - t0)
    flop = 2 * n**3
    out: dict[str, Any] = {"n": n, "precision": precision, "flop_per_matmul": flop}
    for k, s in seconds.items():
        out[k] = {"seconds": s, "flops": flop / statistics.median(s)}
    out["peak_flops"] = max(out[k]["flops"] for k in runs)
    out["peak_from"] = max(runs, key=lambda k: out[k]["flops"])
    return out
