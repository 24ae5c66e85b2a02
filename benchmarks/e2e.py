"""LeNet end to end: wall time and test accuracy of whole training runs, as subprocesses.

``scripts/train.py --net lenet`` with each backend (start-up, data, compilation and run files
included) against the tutorial's own PyTorch loop, ``benchmarks/tutorial_lenet.py``. Both run as
modules (``python -m``) in the checkout this package lies in, whatever the caller's working
directory: the checkout's root is then first on their ``sys.path``, where a script run by its
path would have its own folder first (``scripts/parity.py`` would stand for the ``parity``
package there).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]  # the checkout: benchmarks/ sits beside scripts/
TRAIN_SCRIPT = REPO / "scripts" / "train.py"  # run as the module scripts.train
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def missing_inputs(data_src: Path) -> list[str]:
    """What the end-to-end runs need and cannot find: the training script and the .gz IDX files."""
    missing = [] if TRAIN_SCRIPT.is_file() else [f"{TRAIN_SCRIPT} (the checkout's training script)"]
    return missing + [str(data_src / f"{name}.gz") for name in FASHION_MNIST_FILES
                      if not (data_src / f"{name}.gz").is_file()]


def train_command(backend: str, out: Path) -> list[str]:
    """scripts/train.py training LeNet with its recipe on ``backend`` into the run directory ``out``."""
    return [sys.executable, "-m", "scripts.train", "--net", "lenet", "--backend", backend, "--out", str(out)]


def tutorial_command(root: Path) -> list[str]:
    """The tutorial's loop on the torchvision FashionMNIST root ``root``."""
    return [sys.executable, "-m", "benchmarks.tutorial_lenet", str(root)]


def torchvision_fashion_root(src: Path, root: Path) -> Path:
    """``root`` laid out as torchvision's FashionMNIST expects after its download.

    torchvision reads the raw IDX files uncompressed from ``root/FashionMNIST/raw`` (its download
    step unpacks them there), so Debian's .gz files are unpacked, not linked.
    """
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        with gzip.open(src / f"{name}.gz", "rb") as f:
            (raw / name).write_bytes(f.read())
    return root


def _timed_run(cmd: list[str], timeout: float, env: dict[str, str] | None = None
               ) -> tuple[float, subprocess.CompletedProcess | None, str]:
    """Wall time, process and status ('ok', 'failed ...', 'timeout ...') of ``cmd`` run in the checkout."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=None if env is None else dict(os.environ, **env))
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, None, f"timeout after {timeout:.0f} s"
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}): {proc.stderr[-300:]}"
    return time.perf_counter() - t0, proc, status


def end_to_end(workdir: Path, data_src: Path, timeout: float = 900.0,
               log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Wall time and test accuracy of LeNet's 5-epoch recipe: scripts/train.py with each backend,
    and the tutorial's own loop (key ``material``) on ``data_src``'s files unpacked into ``workdir``.

    JAX runs twice on a compilation cache of its own: first empty (a machine's first run), then
    filled by that first run (every later run).
    """
    runs: dict[str, dict[str, Any]] = {}
    cache = {"FLAXNETS_COMPILE_CACHE": str(workdir / "xla-cache")}
    for key, backend, label in (("jax", "jax", "scripts/train.py --backend jax, first run"),
                                ("jax_warm", "jax", "scripts/train.py --backend jax, compilation cached"),
                                ("torch", "torch", "scripts/train.py --backend torch")):
        out = workdir / f"lenet-{key}"
        cmd = train_command(backend, out)
        wall, _, status = _timed_run(cmd, timeout, cache)
        run = {"label": label, "command": cmd[1:], "status": status, "wall_seconds": wall}
        if status == "ok":
            cfg = json.loads((out / "config.json").read_text())
            run.update(test_acc=cfg["test_acc"], compile_seconds=cfg["compile_seconds"],
                       own_wall_seconds=cfg["wall_seconds"])  # train.py's clock: after the imports
        runs[key] = run
        log(f"  e2e {key}: {status}, {wall:.1f} s, acc {run.get('test_acc')}")
    root = torchvision_fashion_root(data_src, workdir / "torchvision-data")  # outside the timing
    cmd = tutorial_command(root)
    wall, proc, status = _timed_run(cmd, timeout)
    run = {"label": "the material's loop (train_ch5, DataLoader + ToTensor, batch 256)",
           "command": [*cmd[1:-1], "ROOT"], "status": status, "wall_seconds": wall}
    if proc is not None and status == "ok":
        run["test_acc"] = json.loads(proc.stdout.strip().splitlines()[-1])["test_acc"]
        run["log"] = proc.stdout.strip().splitlines()[:-1]
    runs["material"] = run
    log(f"  e2e material: {status}, {wall:.1f} s, acc {run.get('test_acc')}")
    return runs
