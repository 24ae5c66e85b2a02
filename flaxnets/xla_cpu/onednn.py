"""2-D f32 convolutions through oneDNN, as XLA FFI custom calls inside the compiled CPU program.

``csrc/onednn_conv.cc`` holds three XLA FFI handlers (forward, input gradient, kernel gradient)
over oneDNN's convolution primitives; ``python -m flaxnets.xla_cpu.onednn_build`` (run by
``./setup.sh``) compiles it against the oneDNN of the ``onednn-cpu-gomp``/``onednn-devel-cpu-gomp``
wheels and jaxlib's FFI headers into ``_onednn_conv.so`` beside this file. ``conv`` runs a conv
through them, wrapped in a ``custom_vjp``; ``available`` says whether the library loaded, and when
it did not, the first caller is told once (a warning) and keeps XLA's own convolutions.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

Array = jax.Array
LIBRARY = Path(__file__).with_name("_onednn_conv.so")
# beside it, oneDNN's library and an OpenMP runtime of its own (why: onednn_build.py)
LOCAL_DNNL, LOCAL_GOMP = "libdnnl.so.3", "libgomp-flaxnets.so.1"
_TARGETS = {"fwd": "OnednnConvFwd", "bwd_data": "OnednnConvBwdData", "bwd_weights": "OnednnConvBwdWeights"}
# How oneDNN lays out what it works on (the handlers' layout attribute): 0 the NHWC/HWIO buffers
# as they are (oneDNN 3.2 then runs im2col + GEMM), 1 its own blocked formats for everything
# (reordered around each call), 2 NHWC activations and its own blocked kernel (the kernel
# reordered per call, as torch's channels-last convs do; its direct AVX2 kernels). Forward + both
# gradients, batch 128, 3x3, 2-core AMD EPYC (AVX2), layout 0 / 1 / 2, ms: 16->16 on 32x32
# 68 / 18 / 14, 32->32 on 16x16 44 / 15 / 14, 64->64 on 8x8 18 / 13 / 12 (XLA's forms 32, 16,
# 15; torch-CL 18, 15, 13): `python -m benchmarks.onednn_convs`, docs/cpu_speedups.md#onednn_convs.
LAYOUT = 2
_state: dict[str, object] = {}


# Spins of an idle oneDNN thread before it sleeps. libgomp's default, 300,000 (~3 ms), holds a
# core that XLA's fusions between two convs want; libgomp itself spins only 100 once it manages
# more threads than there are cores, which is where oneDNN's teams for two XLA threads put it, so
# 100 from the start. Read by the runtime once, when it loads.
SPIN_COUNT = 100


@contextlib.contextmanager
def _spin_count() -> Iterator[None]:
    """Within the block, GOMP_SPINCOUNT is SPIN_COUNT unless the user set an OpenMP wait policy."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        yield
        return
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    try:
        yield
    finally:
        del os.environ["GOMP_SPINCOUNT"]


def _load() -> str | None:
    """Load the library and register its handlers with XLA; the reason it is unavailable, or None."""
    if "error" in _state:
        return _state["error"]  # type: ignore[return-value]
    error = None
    try:
        # DEEPBIND: oneDNN's calls into OpenMP bind to its own runtime even where torch's libgomp
        # is global in the process
        with _spin_count():
            lib = ctypes.CDLL(str(LIBRARY), mode=os.RTLD_LOCAL | os.RTLD_DEEPBIND)
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(f"flaxnets_onednn_conv_{name}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
        v = lib.OnednnConvVersion
        v.restype = ctypes.c_int64
        _state["version"] = f"{v() // 10000}.{v() // 100 % 100}.{v() % 100}"
    except (OSError, AttributeError) as e:
        error = f"{LIBRARY.name} did not load ({e}); build it with `python -m flaxnets.xla_cpu.onednn_build`"
    _state["error"] = error
    return error


def available() -> bool:
    """Whether the oneDNN convolutions can run here (the first ``False`` also warns, once)."""
    error = _load()
    if error is not None and not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"flaxnets: CPU convolutions keep XLA's own kernels: {error}", RuntimeWarning, stacklevel=3)
    return error is None


def version() -> str | None:
    """The oneDNN version the library links, or None when it is unavailable."""
    return _state.get("version") if available() else None  # type: ignore[return-value]


def _call(kind: str, out: jax.ShapeDtypeStruct, a: Array, b: Array, strides: tuple[int, int],
          padding: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> Array:
    """One handler's custom call on operands ``a`` and ``b`` with result ``out``."""
    return jax.ffi.ffi_call(f"flaxnets_onednn_conv_{kind}", out, vmap_method="sequential")(
        a, b, strides=np.array(strides, np.int64), pad_lo=np.array([p[0] for p in padding], np.int64),
        pad_hi=np.array([p[1] for p in padding], np.int64), dilation=np.array(dilation, np.int64),
        layout=np.int64(LAYOUT))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: Array, k: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
         dilation: tuple[int, int]) -> Array:
    """An NHWC x HWIO f32 conv (one group, no input dilation, padding >= 0) through oneDNN."""
    n, h, w, _ = x.shape
    oh, ow = ((size + sum(padding[d]) - dilation[d] * (k.shape[d] - 1) - 1) // strides[d] + 1
              for d, size in enumerate((h, w)))
    return _call("fwd", jax.ShapeDtypeStruct((n, oh, ow, k.shape[3]), x.dtype), x, k, strides, padding, dilation)


def _conv_fwd(x: Array, k: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
              dilation: tuple[int, int]) -> tuple[Array, tuple[Array, Array]]:
    return conv(x, k, strides, padding, dilation), (x, k)


def _conv_bwd(strides: tuple[int, int], padding: tuple[tuple[int, int], ...], dilation: tuple[int, int],
              res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, k = res
    # XLA drops the input gradient where nothing uses it (a net's first conv)
    dx = _call("bwd_data", jax.ShapeDtypeStruct(x.shape, x.dtype), g, k, strides, padding, dilation)
    dk = _call("bwd_weights", jax.ShapeDtypeStruct(k.shape, k.dtype), x, g, strides, padding, dilation)
    return dx, dk


conv.defvjp(_conv_fwd, _conv_bwd)
