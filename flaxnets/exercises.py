"""The material's small exercises in JAX: learning the edge-detecting (1, 2) kernel with corr2d."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxnets.layers import Conv2D, corr2d

EDGE_KERNEL = np.array([[1.0, -1.0]], np.float32)  # the note's K


def edge_image() -> tuple[np.ndarray, np.ndarray]:
    """The note's 6x8 image X (ones, columns 2:6 zero) and its edge map Y = corr2d(X, K)."""
    x = np.ones((6, 8), np.float32)
    x[:, 2:6] = 0
    return x, np.array(corr2d(x, EDGE_KERNEL))  # a writable copy


@dataclass(frozen=True)
class KernelFit:
    """What ``learn_edge_kernel`` returns: the loss before each step and the start and end parameters."""

    losses: np.ndarray  # (steps,): the loss computed in step i, before its update (what the note prints)
    kernel: np.ndarray  # (1, 2) learned weight
    bias: float
    init_kernel: np.ndarray
    init_bias: float
    init: str  # how the start was drawn, for the printout


def torch_init(torch_seed: int, kernel_size: tuple[int, int] = (1, 2)) -> tuple[np.ndarray, float]:
    """The start the note's PyTorch ``Conv2D`` gets after ``torch.manual_seed(torch_seed)``."""
    import torch

    from torch_ref.layers import Conv2D as TorchConv2D

    torch.manual_seed(torch_seed)
    layer = TorchConv2D(kernel_size)
    return layer.weight.detach().numpy().copy(), float(layer.bias.detach()[0])


def learn_edge_kernel(steps: int = 20, lr: float = 0.01, seed: int = 0,
                      torch_seed: int | None = None) -> KernelFit:
    """Learn K back from (X, Y) by plain gradient descent on the summed squared error, as the note does.

    The start is N(0, 1) like the note's ``torch.randn``: drawn by JAX from ``seed``, or, with
    ``torch_seed``, exactly the values torch draws for the note's ``Conv2D`` under that seed.
    """
    x, y = edge_image()
    conv = Conv2D(EDGE_KERNEL.shape, rngs=nnx.Rngs(seed))
    init = f"N(0, 1) from JAX seed {seed}"
    if torch_seed is not None:
        w, b = torch_init(torch_seed, EDGE_KERNEL.shape)
        conv.weight.set_value(jnp.asarray(w))
        conv.bias.set_value(jnp.asarray([b], jnp.float32))
        init = f"torch.randn after torch.manual_seed({torch_seed})"
    graphdef, params = nnx.split(conv)
    init_kernel, init_bias = np.asarray(conv.weight[...]), float(conv.bias[...][0])

    def loss_fn(p: nnx.State) -> jax.Array:
        return jnp.sum((nnx.merge(graphdef, p)(x) - y) ** 2)

    def step(p: nnx.State, _: None) -> tuple[nnx.State, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        return jax.tree.map(lambda a, g: a - lr * g, p, grads), loss

    params, losses = jax.jit(lambda p: jax.lax.scan(step, p, None, length=steps))(params)
    nnx.update(conv, params)
    return KernelFit(np.asarray(losses), np.asarray(conv.weight[...]), float(conv.bias[...][0]),
                     init_kernel, init_bias, init)


def format_fit(fit: KernelFit, every: int = 5) -> str:
    """The note's printout: 'Step i, loss l' every ``every`` steps, then the weight and the bias."""
    fmt = dict(precision=4, floatmode="fixed", separator=", ")
    lines = [f"init ({fit.init}): weight {np.array2string(fit.init_kernel, **fmt)}, "
             f"bias {fit.init_bias:.4f}"]
    lines += [f"Step {i}, loss {fit.losses[i - 1]:.3f}"
              for i in range(every, len(fit.losses) + 1, every)]
    lines.append(f"weight:  {np.array2string(fit.kernel, **fmt)}")
    lines.append(f"bias:  [{fit.bias:.4f}]")
    return "\n".join(lines)
