"""The accelerator check (scripts/accel_check.py) on the CPU at small sizes, without
tensorflow(-datasets) importable; its environment, precision switch and docs section."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import accel

ROOT = Path(__file__).resolve().parents[1]
# runs the script as __main__ with tensorflow and tensorflow-datasets made unimportable (as on
# the accelerator machine, which has neither), then says whether either got loaded anyway
RUNNER = """
import runpy, sys
for m in ("tensorflow", "tensorflow_datasets"):
    sys.modules[m] = None  # `import m` now raises ImportError
sys.argv = ["scripts/accel_check.py", *sys.argv[1:]]
try:
    runpy.run_path("scripts/accel_check.py", run_name="__main__")
finally:
    print("LOADED:", [m for m in ("tensorflow", "tensorflow_datasets") if sys.modules.get(m) is not None])
"""


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", RUNNER, "--quick", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "LOADED: []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc, json.loads((out / "accel.json").read_text()), (out / "accel.md").read_text()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One small run of the whole check: two nets' parity, LeNet's training and throughput."""
    return run_check(tmp_path_factory.mktemp("accel"), "--parity-nets", "net_batchnorm", "net_dropout",
                     "--nets", "lenet", "--variants", "jax", "torch", "--train-steps", "6",
                     "--repeats", "1", "--settle", "0", "--round-seconds", "0", "--peak-size", "256")


def test_the_check_runs_deterministic_on_the_cpu_without_tensorflow(quick_run):
    proc, rep, md = quick_run
    assert rep["device"]["jax_backend"] == "cpu" and rep["device"]["torch_device"] == "cpu"
    assert accel.DETERMINISTIC_XLA_FLAG in rep["env"]["XLA_FLAGS"] and not rep["env"]["jax_imported_before"]
    assert rep["env"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert rep["torch"]["deterministic_algorithms"] is True
    assert rep["verdict"] and all(rep["verdict"].values())
    assert md in proc.stdout  # the markdown is printed as written


def test_parity_runs_at_both_precisions_and_passes_the_tolerances(quick_run):
    _, rep, md = quick_run
    par = rep["parity"]
    tol = par["tolerances"]
    assert {(r["net"], r["mode"]) for r in par["rows"]} == {
        (n, m) for n in ("net_batchnorm", "net_dropout") for m in accel.MODES}
    for r in par["rows"]:
        assert r["ok"] and not r["failures"] and r["roundtrip_exact"]
        assert 0 <= r["logits_delta"] <= tol["logits_rtol"] and 0 <= r["grads_delta_f64"] <= tol["grad_rtol"]
        assert r["input"] == [32, 32, 3]
    f32 = [r for r in par["rows"] if r["mode"] == "f32"]
    assert all(r["precision_settings"]["jax_default_matmul_precision"] == "highest" for r in f32)
    assert par["ok"] and "Full-float32 parity: PASS" in md
    assert "| net_batchnorm |" in md


def test_training_on_device_data_lowers_the_loss_in_both_frameworks(quick_run):
    _, rep, md = quick_run
    runs = {r["backend"]: r for r in rep["training"]}
    assert set(runs) == {"jax", "torch"}
    for r in runs.values():
        assert len(r["epoch_loss"]) == r["epochs"] == 3 and all(math.isfinite(x) for x in r["epoch_loss"])
        assert r["loss_fell"] and r["epoch_loss"][-1] < r["epoch_loss"][0]
        assert r["data_device"] == "cpu"
        assert all(0 < d <= c for d, c in zip(r["dispatch_seconds"], r["completion_seconds"]))
        assert 0 < r["dispatch_fraction"] <= 1
    assert "| jax | lenet | 32 × 6 | 3 |" in md


def test_throughput_has_both_precisions_their_ratios_and_peak_shares(quick_run):
    _, rep, md = quick_run
    assert set(rep["peaks"]) == {"fp32", "bf16"} and all(p["peak_flops"] > 0 for p in rep["peaks"].values())
    rows = {r["precision"]: r for r in rep["throughput"]}
    assert set(rows) == {"fp32", "bf16"}
    for r in rows.values():
        assert r["status"] == "ok" and r["net"] == "lenet" and r["batch"] == accel.QUICK_BATCH["lenet"]
        assert set(r["variants"]) == {"jax", "torch"}
        assert all(v["status"] == "ok" and v["median_images_per_s"] > 0 for v in r["variants"].values())
        assert r["jax_over_best_eager"] > 0 and r["jax_over_torch_compile"] is None
        assert all(0 < p < 100 for p in r["percent_of_peak"].values())
        assert r["train_flops_per_image"] == 3 * r["forward_flops_per_image"] > 0
    assert set(rows["bf16"]["bf16_over_fp32"]) == {"jax", "torch"}
    assert md.count("| lenet | 28×28×1 | 32 |") == 2


@pytest.mark.slow
def test_torch_compile_is_timed_beside_jax(tmp_path):
    _, rep, md = run_check(tmp_path, "--parity-nets", "--train-net", "none", "--nets", "lenet",
                           "--precisions", "fp32", "--variants", "jax", "torch_compile",
                           "--repeats", "1", "--settle", "0", "--round-seconds", "0", "--peak-size", "256")
    (row,) = rep["throughput"]
    tc = row["variants"]["torch_compile"]
    assert tc["status"] == "ok" and tc["median_images_per_s"] > 0 and tc["compile_seconds"] >= 0
    assert row["jax_over_torch_compile"] > 0 and "parity" not in rep and "training" not in rep


def test_accelerator_env_adds_the_determinism_flags_once_and_keeps_others():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    got = accel.accelerator_env(True, env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {accel.DETERMINISTIC_XLA_FLAG}"
    accel.accelerator_env(True, env)
    assert env["XLA_FLAGS"].count("xla_gpu_deterministic_ops") == 1
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert got["deterministic"] is True
    plain: dict[str, str] = {}
    accel.accelerator_env(False, plain)
    assert "XLA_FLAGS" not in plain and "CUBLAS_WORKSPACE_CONFIG" not in plain


def test_full_f32_sets_both_frameworks_to_ieee_float32_and_restores_them():
    import jax
    import torch

    before = accel.torch_precision_settings()
    with accel.full_f32() as settings:
        assert jax.config.jax_default_matmul_precision == "highest"
        assert settings["jax_default_matmul_precision"] == "highest"
        now = accel.torch_precision_settings()
        assert set(now) == set(before) and all(v in ("ieee", False) for v in now.values())
        if hasattr(torch.backends.cudnn, "conv"):
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert accel.torch_precision_settings() == before
    assert jax.config.jax_default_matmul_precision != "highest"


def test_write_docs_replaces_only_its_section_and_refuses_a_file_without_one(tmp_path):
    begin, end = accel.section_markers("gpu")
    doc = tmp_path / "b.md"
    doc.write_text(f"intro\n{begin}\nold\n{end}\noutro\n")
    accel.write_docs("| new | table |\n", "gpu", doc)
    assert doc.read_text() == f"intro\n{begin}\n| new | table |\n{end}\noutro\n"
    with pytest.raises(ValueError):
        accel.write_docs("x", "cpu", doc)
    assert "| new | table |" in doc.read_text()


def test_the_docs_hold_one_gpu_and_one_cpu_section():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for kind in ("gpu", "cpu"):
        assert all(text.count(m) == 1 for m in accel.section_markers(kind))


def test_learnable_splits_are_class_templates_with_noise():
    import numpy as np

    s = accel.learnable_splits("net", 4, 3, (32, 32, 3))
    assert s.x_train.shape == (12, 32, 32, 3) and s.x_train.dtype == np.uint8
    assert set(np.unique(s.y_train)) <= {0, 1}
    same = s.x_train[s.y_train == s.y_train[0]]
    assert 0.3 < float(np.mean(same[0] == same[-1])) < 0.9  # shared template, separate noise
