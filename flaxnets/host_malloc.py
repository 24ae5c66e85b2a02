"""Run the training and benchmark scripts under tcmalloc, which keeps freed blocks for reuse.

Each execution of an XLA:CPU step allocates its temporaries as one block (286 MB for resnet20 at
batch 128) on a worker thread. glibc's malloc mmaps a block that size (a worker's arena cannot
hold it) and munmaps it when freed, so every step faults all its pages in again: 73,000 minor
faults and ~230 ms of kernel time per resnet20 step on the 2-core AMD EPYC (`perf record -e
syscalls:sys_enter_mmap --call-graph dwarf` traces the mmap to ``CpuDeviceMemory::AllocateInto``).
glibc's own settings cannot keep it without a single arena, which slows the small nets' steps
1.2-2x; tcmalloc keeps it with per-thread caches (docs/cpu_speedups.md#tcmalloc).

A preload only takes effect at process start, so ``run_under_tcmalloc`` re-executes the script
with ``LD_PRELOAD`` set, before anything heavy is imported. Both frameworks of a benchmark then
share the allocator. ``FLAXNETS_MALLOC=glibc`` keeps glibc's malloc.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "FLAXNETS_MALLOC"
# Debian's libtcmalloc-minimal4 (./setup.sh installs it)
LIBRARIES = tuple(Path(f"/usr/lib/{arch}-linux-gnu/libtcmalloc_minimal.so.4") for arch in ("x86_64", "aarch64"))


def tcmalloc_library() -> Path | None:
    """The tcmalloc shared library on this machine, or None."""
    return next((p for p in LIBRARIES if p.is_file()), None)


def active_malloc() -> str:
    """``"tcmalloc"`` when this process runs under tcmalloc, else ``"glibc"``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "tcmalloc" if "libtcmalloc" in maps else "glibc"


def run_under_tcmalloc() -> None:
    """Re-execute this script under tcmalloc where it is installed and not yet loaded; return
    without doing anything otherwise (or with ``FLAXNETS_MALLOC=glibc``, or after the re-exec)."""
    lib = tcmalloc_library()
    if not sys.platform.startswith("linux") or lib is None or os.environ.get(ENV) in ("glibc", "tcmalloc"):
        return
    if active_malloc() == "tcmalloc":
        return
    preload = " ".join(filter(None, [str(lib), os.environ.get("LD_PRELOAD", "")]))
    env = dict(os.environ, LD_PRELOAD=preload, **{ENV: "tcmalloc"})  # the child does not re-exec
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
