"""Build ``_onednn_conv.so`` (``flaxnets.xla_cpu.onednn``) from ``csrc/onednn_conv.cc``.

``python -m flaxnets.xla_cpu.onednn_build`` compiles it with g++ against the oneDNN headers and
library that the ``onednn-devel-cpu-gomp``/``onednn-cpu-gomp`` wheels put under ``sys.prefix``
(``include/oneapi/dnnl``, ``lib/libdnnl.so``) and the XLA FFI headers jaxlib ships
(``jax.ffi.include_dir()``), with an rpath to that library. ``./setup.sh`` runs it; when
something is missing it says what and exits 1, and the XLA convolutions run instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from flaxnets.xla_cpu.onednn import LIBRARY

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "onednn_conv.cc"


def command(prefix: Path | None = None) -> list[str]:
    """The g++ command line that builds the library (raises FileNotFoundError naming what is missing)."""
    import jax

    prefix = Path(prefix or sys.prefix)
    lib, include = prefix / "lib", prefix / "include"
    cxx = shutil.which("g++") or shutil.which("c++")
    for what, ok in ((str(SOURCE), SOURCE.is_file()), ("g++", cxx is not None),
                     (str(include / "oneapi" / "dnnl" / "dnnl.hpp"), (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file()),
                     (str(lib / "libdnnl.so"), (lib / "libdnnl.so").exists())):
        if not ok:
            raise FileNotFoundError(what)
    return [str(cxx), "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", f"-I{include}",
            str(SOURCE), f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}", "-o", str(_PARTIAL)]


# written beside, then renamed over the library: a process that has the old one loaded keeps it
_PARTIAL = LIBRARY.with_name(LIBRARY.name + ".partial")


def main() -> int:
    """Build the library; 0 when it was built, 1 (with the reason on stderr) when not."""
    try:
        cmd = command()
    except FileNotFoundError as e:
        print(f"onednn_build: {e} not found; the CPU convolutions keep XLA's own kernels", file=sys.stderr)
        return 1
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"onednn_build: g++ failed; the CPU convolutions keep XLA's own kernels\n{done.stderr[-4000:]}",
              file=sys.stderr)
        return 1
    os.replace(_PARTIAL, LIBRARY)
    print(f"onednn_build: built {LIBRARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
