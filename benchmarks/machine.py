"""The machine a run measured: CPU, cores, load, thread settings and library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load, thread and malloc settings, whether the convs ran through oneDNN,
    and library versions of this run."""
    import importlib.metadata as md

    import jax
    import torch

    from flaxnets.host_malloc import active_malloc
    from flaxnets.xla_cpu import onednn
    from flaxnets.xla_cpu.conv import onednn_convs_here

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "loadavg_start": os.getloadavg(),
            "jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()),
            "torch_threads": torch.get_num_threads(),
            "torch_inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default (on disk)"),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "malloc": active_malloc(),  # both frameworks' allocator (flaxnets/host_malloc.py)
            # the version JAX's CPU convs of 9-64 channels ran through (onednn_convs), or "off"
            "onednn_convs": onednn.version() if onednn_convs_here() else "off",
            "versions": versions}
