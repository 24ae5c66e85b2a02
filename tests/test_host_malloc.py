"""The scripts' re-exec under tcmalloc (flaxnets.host_malloc): it happens where tcmalloc is
installed, keeps the command line, is skipped with FLAXNETS_MALLOC=glibc, and keeps XLA's
per-step block mapped where glibc faults it in again every call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flaxnets.host_malloc import tcmalloc_library

needs_tcmalloc = pytest.mark.skipif(tcmalloc_library() is None, reason="tcmalloc is not installed (./setup.sh)")

# A script that re-executes itself and reports its allocator, its arguments and the minor faults
# of its fewest-faulting call of a step with two 64 MB temporaries (the barriers keep them apart).
_SCRIPT = """
import json, resource, sys
from flaxnets.host_malloc import active_malloc, run_under_tcmalloc
run_under_tcmalloc()
import jax, jax.numpy as jnp

@jax.jit
def f(x):
    a = jax.lax.optimization_barrier(jnp.sin(x))
    b = jax.lax.optimization_barrier(jnp.cos(a))
    return (a + b).sum()

x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(6):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"malloc": active_malloc(), "argv": sys.argv[1:], "fewest_faults": min(faults[1:])}))
"""
_TEMP_PAGES = 2 * 4096 * 4096 * 4 // 4096


def _run(tmp_path, **env: str) -> dict:
    script = tmp_path / "step.py"
    script.write_text(_SCRIPT)
    env = {**{k: v for k, v in os.environ.items() if k not in ("FLAXNETS_MALLOC", "LD_PRELOAD")}, **env}
    out = subprocess.run([sys.executable, str(script), "--flag", "a b"], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_tcmalloc
def test_the_script_reruns_under_tcmalloc_and_its_steps_stop_faulting(tmp_path):
    under = _run(tmp_path)
    glibc = _run(tmp_path, FLAXNETS_MALLOC="glibc")
    assert under["malloc"] == "tcmalloc" and glibc["malloc"] == "glibc"
    assert under["argv"] == glibc["argv"] == ["--flag", "a b"]  # the command line survives the re-exec
    # glibc mmaps and munmaps the temporaries every call: each of their pages faults again
    assert glibc["fewest_faults"] >= _TEMP_PAGES // 2, glibc
    assert under["fewest_faults"] < _TEMP_PAGES // 20, under


def test_without_tcmalloc_the_script_runs_on_glibc(tmp_path, monkeypatch):
    import flaxnets.host_malloc as hm

    monkeypatch.setattr(hm, "LIBRARIES", (tmp_path / "absent.so",))
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    hm.run_under_tcmalloc()
    assert calls == [] and hm.tcmalloc_library() is None
