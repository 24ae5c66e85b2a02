"""Run the heavy part of a deep net's test in a child process that compiles faster.

The deepest nets compile for minutes. A child with XLA's backend (LLVM) optimisation off
compiles them in about half to two thirds of the time, with the same arithmetic: measured on
the 2-core CPU, densenet121's parity check 82 -> 58 s, its first training epoch's compile -53 %
(same first-epoch loss to 4 digits). Their steps run slower, so only these nets take this path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEEP = {"resnet1202", "densenet121", "densenet121_se", "densenet169", "densenet201"}
# The nets whose tests belong to the slow tier (pytest -m "not slow" leaves them out): the deep
# ones and the ResNets past resnet20, whose compiles alone take tens of seconds each.
SLOW_NETS = DEEP | {"resnet32", "resnet44", "resnet56", "resnet110"}


def by_tier(names: list[str]) -> list[Any]:
    """``names`` as pytest parameters, those of SLOW_NETS marked ``slow``."""
    import pytest

    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_NETS else n for n in names]
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"

_CHILD = ("import importlib, json, sys; mod, fn = sys.argv[1].rsplit('.', 1); "
          "print(json.dumps(getattr(importlib.import_module(mod), fn)(*sys.argv[2:])))")


def call_in_child(function: str, *args: str, timeout: float = 1800, fast_compile: bool = True) -> Any:
    """``module.function(*args)`` in a child Python (with FAST_COMPILE_FLAGS unless told not); its
    JSON result."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(os.environ, XLA_FLAGS=f"{flags} {FAST_COMPILE_FLAGS}" if fast_compile else flags)
    out = subprocess.run([sys.executable, "-c", _CHILD, function, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
