"""Build ``_onednn_conv.so`` (``flaxnets.xla_cpu.onednn``) from ``csrc/onednn_conv.cc``.

``python -m flaxnets.xla_cpu.onednn_build`` compiles it with g++ against the oneDNN headers and
library that the ``onednn-devel-cpu-gomp``/``onednn-cpu-gomp`` wheels put under ``sys.prefix``
(``include/oneapi/dnnl``, ``lib/libdnnl.so``) and the XLA FFI headers jaxlib ships
(``jax.ffi.include_dir()``). ``./setup.sh`` runs it; when something is missing it says what and
exits 1, and the XLA convolutions run instead.

oneDNN gets an OpenMP runtime of its own: a copy of the libgomp that its library links, renamed
(``patchelf``), beside a copy of that library that asks for it by the new name, both next to the
extension (``LOCAL_GOMP``, ``onednn.py`` loads them with RTLD_DEEPBIND). One libgomp shared with
torch (whose own libgomp.so.1 is global in any process that imports it) counts the threads
oneDNN's teams keep for each XLA thread among its own, passes the number of cores, and from then
on cuts every team's spin before sleeping from 300,000 to 100: torch's steps in that process
ran ~45 % slower (net, torch-CL, 9.5 -> 13.3-14.0 ms per step after one JAX epoch through oneDNN;
after one through XLA's convs: 8.8 -> 8.8-9.3).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from flaxnets.xla_cpu.onednn import LIBRARY, LOCAL_DNNL, LOCAL_GOMP

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "onednn_conv.cc"


def _linked_gomp(library: Path) -> Path:
    """The libgomp.so.1 that the dynamic loader gives ``library`` (``ldd``)."""
    done = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        name, _, where = line.strip().partition(" => ")
        if name == "libgomp.so.1" and where.startswith("/"):
            return Path(where.split(" (")[0])
    raise FileNotFoundError(f"the libgomp.so.1 of {library}")


def local_runtime(prefix: Path | None = None) -> None:
    """Copy oneDNN's library and its libgomp beside the extension, the copy of libgomp renamed
    ``LOCAL_GOMP`` and the library's copy asking for it (raises FileNotFoundError naming what is
    missing, CalledProcessError when patchelf fails)."""
    dnnl = Path(prefix or sys.prefix) / "lib" / LOCAL_DNNL
    patchelf = shutil.which("patchelf")
    for what, ok in ((str(dnnl), dnnl.exists()), ("patchelf", patchelf is not None)):
        if not ok:
            raise FileNotFoundError(what)
    def patched_copy(src: Path, name: str, *edits: str) -> None:
        tmp = LIBRARY.with_name(name + ".partial")  # renamed over the copy when done, as the extension
        shutil.copyfile(src, tmp)
        subprocess.run([str(patchelf), *edits, str(tmp)], check=True)
        os.replace(tmp, LIBRARY.with_name(name))

    patched_copy(_linked_gomp(dnnl), LOCAL_GOMP, "--set-soname", LOCAL_GOMP)
    patched_copy(dnnl, LOCAL_DNNL, "--replace-needed", "libgomp.so.1", LOCAL_GOMP, "--set-rpath", "$ORIGIN")


def command(prefix: Path | None = None) -> list[str]:
    """The g++ command line that builds the library against the local copy of oneDNN's library
    (``local_runtime``; raises FileNotFoundError naming what is missing)."""
    import jax

    include = Path(prefix or sys.prefix) / "include"
    cxx = shutil.which("g++") or shutil.which("c++")
    for what, ok in ((str(SOURCE), SOURCE.is_file()), ("g++", cxx is not None),
                     (str(include / "oneapi" / "dnnl" / "dnnl.hpp"), (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file()),
                     (str(LIBRARY.parent / LOCAL_DNNL), (LIBRARY.parent / LOCAL_DNNL).exists())):
        if not ok:
            raise FileNotFoundError(what)
    return [str(cxx), "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", f"-I{include}",
            str(SOURCE), str(LIBRARY.parent / LOCAL_DNNL), "-Wl,-rpath,$ORIGIN", "-o", str(_PARTIAL)]


# written beside, then renamed over the library: a process that has the old one loaded keeps it
_PARTIAL = LIBRARY.with_name(LIBRARY.name + ".partial")


def main() -> int:
    """Build the library; 0 when it was built, 1 (with the reason on stderr) when not."""
    try:
        local_runtime()
        cmd = command()
    except subprocess.CalledProcessError as e:
        print(f"onednn_build: {e}; the CPU convolutions keep XLA's own kernels", file=sys.stderr)
        return 1
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
