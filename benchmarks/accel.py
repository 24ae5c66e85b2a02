"""The accelerator check: parity on the device, train-step throughput and a short training run.

``python scripts/accel_check.py`` runs it on whatever backend JAX sees (GPU, TPU or the CPU), the
torch side on CUDA when torch has it, else on the CPU:

- **Parity** (``parity.check.check_net``, the usual tolerances) of the small nets, resnet20 and
  densenet121, twice: at each framework's default float32 precision (JAX may use TF32 for f32
  dots and convs on recent GPUs, torch's cuDNN convs default to TF32: the deltas are reported),
  and with both at full float32 (``full_f32``), where every check must pass.
- **Throughput** per training step, JAX against torch eager and ``torch.compile``, fp32 and bf16,
  by ``benchmarks.throughput.measure_case`` (one process, the variants interleaved, compilation
  timed apart), with each net's % of the device's measured matmul peak of that precision.
- **Training**: a few epochs per framework on learnable synthetic data held by the engine on the
  device; the loss must fall. Whether the host waits per step is read from the engines' progress
  callback: it runs after each step is dispatched, so the time to the last callback (dispatch)
  against the time ``train_epoch`` takes to return (completion) shows an asynchronous loop; on
  CUDA torch's synchronising calls are counted as well (``torch.cuda.set_sync_debug_mode``).

Determinism: ``accelerator_env`` sets ``--xla_gpu_deterministic_ops=true`` (before JAX starts)
and ``CUBLAS_WORKSPACE_CONFIG``; torch runs with ``use_deterministic_algorithms(True,
warn_only=True)`` (ops without a deterministic CUDA kernel, e.g. adaptive average pooling's
backward, warn instead of failing). Both hold for the whole run, throughput included.

Nothing here imports tensorflow(-datasets); JAX is imported only inside the functions, so that
``accelerator_env`` can run first.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.flops import matmul_peak
from benchmarks.report import num, replace_section, variant_cell

if TYPE_CHECKING:
    from benchmarks.throughput import Case
    from flaxnets.fit import Splits

SMALL_NETS = ("lenet", "dilated", "net", "net_width", "net_dropout", "net_batchnorm")
PARITY_NETS = (*SMALL_NETS, "resnet20", "densenet121")
THROUGHPUT_NETS = ("resnet20", "densenet121", "lenet", "net", "resnet56")  # the goal's nets first
VARIANTS = ("jax", "torch", "torch_compile")
PRECISIONS = ("fp32", "bf16")
MODES = ("default", "f32")  # parity at each framework's default precision, and at full float32
# one large batch per net beside the recipe's, and the DenseNet's input side on an accelerator
LARGE_BATCH = {"lenet": 4096, "net": 2048, "resnet20": 1024, "resnet56": 512, "densenet121": 128}
ACCEL_IMAGE = 224
# --quick (the CPU): tiny batches, few steps, DenseNet at 32x32 (not in parity), no large batch
QUICK_BATCH = {"lenet": 32, "net": 16, "resnet20": 8, "resnet56": 4, "densenet121": 2}
QUICK_IMAGE = 32
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


_START = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr, with the seconds since this module was imported."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- environment
def accelerator_env(deterministic: bool = True, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Set the environment JAX and torch read at start-up; what was set, and whether JAX had
    already been imported (then XLA_FLAGS may come too late)."""
    env = os.environ if environ is None else environ
    if deterministic:
        flags = env.get("XLA_FLAGS", "")
        if "xla_gpu_deterministic_ops" not in flags:
            env["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_XLA_FLAG}".strip()
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' deterministic workspace
    # JAX takes 75 % of the GPU's memory at start by default: torch's engines would run out
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return {"deterministic": deterministic, "XLA_FLAGS": env.get("XLA_FLAGS", ""),
            "CUBLAS_WORKSPACE_CONFIG": env.get("CUBLAS_WORKSPACE_CONFIG", ""),
            "XLA_PYTHON_CLIENT_PREALLOCATE": env.get("XLA_PYTHON_CLIENT_PREALLOCATE", ""),
            "jax_imported_before": "jax" in sys.modules}


def torch_setup(deterministic: bool = True) -> dict[str, Any]:
    """Deterministic torch algorithms (warn-only) and no cuDNN autotuning; the settings."""
    import torch

    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def default_torch_device() -> str:
    """Where the torch side runs: the torch engine's default device ('cuda' when torch has one)."""
    from torch_ref.engine import default_device

    return str(default_device())


# torch >= 2.9 spells float32 precision per backend and op; the older allow_tf32 flags are
# deprecated there. Each (object, attribute, full-float32 value) is set only where it exists.
def _torch_precision_flags() -> list[tuple[Any, str, Any]]:
    import torch

    cuda_mm, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(cuda_mm, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return [(cuda_mm, "fp32_precision", "ieee"), (conv, "fp32_precision", "ieee")]
    return [(cuda_mm, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]


def torch_precision_settings() -> dict[str, Any]:
    """torch's float32 precision flags as they are now."""
    return {f"{type(obj).__name__}.{attr}": getattr(obj, attr) for obj, attr, _ in _torch_precision_flags()}


@contextlib.contextmanager
def full_f32() -> Iterator[dict[str, Any]]:
    """Both frameworks at full float32: JAX's dots and convs at ``highest`` precision, torch's
    CUDA matmuls and cuDNN convs at IEEE float32 (no TF32); restored on exit. Yields the settings."""
    import jax

    flags = _torch_precision_flags()
    old = [getattr(obj, attr) for obj, attr, _ in flags]
    try:
        with jax.default_matmul_precision("highest"):
            for obj, attr, value in flags:
                setattr(obj, attr, value)
            yield {"jax_default_matmul_precision": "highest", **torch_precision_settings()}
    finally:
        for (obj, attr, _), value in zip(flags, old):
            setattr(obj, attr, value)


def device_info() -> dict[str, Any]:
    """What JAX and torch run on: backend, device kind, count; torch's device and its name."""
    import jax
    import torch

    dev = jax.devices()[0]
    out = {"jax_backend": jax.default_backend(), "jax_device_kind": dev.device_kind,
           "jax_devices": jax.device_count(), "torch_device": default_torch_device()}
    out["torch_device_name"] = torch.cuda.get_device_name(0) if out["torch_device"] == "cuda" else "cpu"
    return out


# --------------------------------------------------------------------------- parity
def parity_row(name: str, mode: str, device: str) -> dict[str, Any]:
    """``check_net(name)`` with its torch side on ``device``, as JSON data."""
    import flaxnets
    from parity.check import check_net

    t0 = time.perf_counter()
    res = check_net(name, device=device)
    div = res.divergence
    return {"net": name, "mode": mode, "ok": res.ok, "failures": res.failures,
            "logits_delta": res.logits_delta, "train_logits_delta_f64": res.train_logits_delta,
            "train_f32_error": res.train_f32_error, "torch_f32_error": res.torch_f32_error,
            "bn_stats_delta": res.bn_stats_delta, "grads_delta_f64": res.grads_delta,
            "worst_grad": res.worst_grad, "roundtrip_exact": res.roundtrip_exact,
            "first_divergence": None if div is None else {"path": div.path, "kind": div.kind,
                                                          "delta": div.delta},
            "input": list(flaxnets.get_spec(name).check_shape), "seconds": time.perf_counter() - t0}


def run_parity(nets: tuple[str, ...], device: str) -> dict[str, Any]:
    """Every net's parity at default precision and at full float32; ``ok``: all full-f32 pass.

    Each net runs at its registry ``check_shape`` even with ``--quick``: the tolerances hold
    there (densenet121 at 32x32, 1x1 before its classifier, is 1.6e-5 off on the CPU, over 1e-5).
    """
    from parity.comparison import F32_ERROR_RATIO, GRAD_RTOL, LOGIT_RTOL

    rows = []
    for mode in MODES:
        with full_f32() if mode == "f32" else contextlib.nullcontext({}) as settings:
            for name in nets:
                log(f"parity {name} ({mode} precision)")
                row = parity_row(name, mode, device)
                row["precision_settings"] = settings or {"torch": torch_precision_settings()}
                rows.append(row)
                log(f"  {'PASS' if row['ok'] else 'FAIL'}: eval logits Δ {row['logits_delta']:.1e}, "
                    f"grads Δ {row['grads_delta_f64']:.1e} ({row['seconds']:.0f} s)")
    return {"rows": rows, "tolerances": {"logits_rtol": LOGIT_RTOL, "grad_rtol": GRAD_RTOL,
                                         "f32_error_ratio": F32_ERROR_RATIO},
            "ok": all(r["ok"] for r in rows if r["mode"] == "f32")}


# --------------------------------------------------------------------------- peak


# --------------------------------------------------------------------------- throughput
@dataclass(frozen=True)
class Settings:
    """How the throughput cases are timed (``measure_case``'s arguments)."""

    steps: int = 10
    repeats: int = 3
    warmup: int = 1
    round_seconds: float = 0.5
    settle: int = 1
    compile_timeout: float = 120.0


def throughput_cases(nets: tuple[str, ...], precisions: tuple[str, ...], quick: bool, large: bool,
                     steps: int) -> list[Case]:
    """The cases to time: each net at its recipe's batch, then (``large``) at its large batch;
    the goal's nets first, so a time budget cuts the others."""
    from benchmarks.throughput import Case
    from flaxnets.recipes import recipe_for
    from flaxnets.registry import get_spec

    def case(net: str, batch: int, precision: str) -> Case:
        spec = get_spec(net)
        h, w, c = spec.input_shape
        if spec.any_size:
            h = w = QUICK_IMAGE if quick else ACCEL_IMAGE
        return Case(net, batch, (h, w, c), steps, precision)

    batches = [{n: QUICK_BATCH.get(n, 8) if quick else recipe_for(n).batch_size for n in nets}]
    if large and not quick:
        batches.append({n: LARGE_BATCH.get(n, 4 * recipe_for(n).batch_size) for n in nets})
    return [case(n, b[n], p) for b in batches for n in nets for p in precisions]


def run_throughput(cases: list[Case], variants: tuple[str, ...], peaks: dict[str, dict[str, Any]],
                   settings: Settings, deadline: float, compile_nets: tuple[str, ...] | None = None
                   ) -> list[dict[str, Any]]:
    """``measure_case`` of each case (those after ``deadline``, a perf_counter time, are
    skipped), with FLOPs, % of the peak of the case's precision and the JAX ratios;
    ``torch_compile`` only for ``compile_nets`` (None: every net)."""
    from benchmarks.throughput import paired_ratio, measure_case, summarise

    rows = []
    for case in cases:
        head = {"net": case.net, "batch": case.batch, "input": list(case.input_shape),
                "precision": case.precision}
        vs = tuple(v for v in variants
                   if v != "torch_compile" or compile_nets is None or case.net in compile_nets)
        left = deadline - time.perf_counter()
        if left <= 0:
            rows.append({**head, "status": "skipped: time budget spent"})
            log(f"throughput {case.net} batch {case.batch} {case.precision}: skipped (time budget)")
            continue
        log(f"throughput {case.net} batch {case.batch} {'x'.join(map(str, case.input_shape))} "
            f"{case.precision}: {', '.join(vs)}")
        row = measure_case(case, vs, settings.repeats, settings.warmup,
                           min(settings.compile_timeout, max(left, 1.0)), round_seconds=settings.round_seconds,
                           settle=settings.settle, log=log)
        row = summarise(row, peaks[case.precision]["peak_flops"])
        row["status"] = "ok"
        row["jax_over_torch_compile"] = (paired_ratio(row, "torch_compile")
                                         if row["variants"].get("torch_compile", {}).get("status") == "ok"
                                         else None)
        ips = {v: r.get("median_images_per_s") for v, r in row["variants"].items()}
        log("  " + ", ".join(f"{v} {x:,.0f} img/s" if x else f"{v} {row['variants'][v]['status']}"
                             for v, x in ips.items()))
        rows.append(row)
        _free_torch_memory()  # the case's engines are gone: their blocks back for the next case
    _bf16_speedups(rows)
    return rows


def _free_torch_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bf16_speedups(rows: list[dict[str, Any]]) -> None:
    """Each bf16 row's ``bf16_over_fp32``: per variant, its img/s over the same case's in fp32."""
    fp32 = {(r["net"], r["batch"]): r for r in rows if r.get("precision") == "fp32" and r["status"] == "ok"}
    for r in rows:
        base = fp32.get((r["net"], r["batch"]))
        if r.get("precision") != "bf16" or r["status"] != "ok" or base is None:
            continue
        r["bf16_over_fp32"] = {
            v: x["median_images_per_s"] / base["variants"][v]["median_images_per_s"]
            for v, x in r["variants"].items()
            if x["status"] == "ok" and base["variants"].get(v, {}).get("status") == "ok"}


# --------------------------------------------------------------------------- training
def learnable_splits(net: str, batch: int, steps: int, input_shape: tuple[int, int, int],
                     seed: int = 0) -> Splits:
    """Synthetic uint8 images a net can learn fast: each class a random template, each image its
    class's template with a third of its pixels replaced by noise; ``steps`` full batches."""
    from flaxnets.fit import Splits
    from flaxnets.registry import get_spec

    classes = get_spec(net).num_classes
    rng = np.random.default_rng(seed)
    n = batch * steps
    templates = rng.integers(0, 256, (classes, *input_shape), dtype=np.uint8)
    y = rng.integers(0, classes, n).astype(np.int32)
    noise = rng.integers(0, 256, (n, *input_shape), dtype=np.uint8)
    x = np.where(rng.random((n, *input_shape)) < 1 / 3, noise, templates[y])
    return Splits(x, y, x[:batch], y[:batch])


def _data_device(engine: Any) -> str:
    """Where an engine holds its training images: JAX's platform(s), or torch's device."""
    x = getattr(engine, "x_dev", None)
    if x is not None:
        return ",".join(sorted({d.platform for d in x.devices()}))
    x = getattr(engine, "x_train", None)
    return str(x.device) if x is not None else "unknown"


def timed_epoch(engine: Any, epoch: int) -> tuple[np.ndarray, float, float, int | None]:
    """(per-step sums, dispatch s, completion s, torch syncs) of one ``train_epoch``: dispatch is
    the time to the progress callback after the last step, completion the time to its return;
    syncs: torch's synchronising CUDA calls in the epoch (None off CUDA or for JAX)."""
    marks: list[float] = []
    sync_count = None
    count_syncs = engine.backend == "torch" and next(engine.model.parameters()).device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        if count_syncs:
            import torch

            warnings.simplefilter("always")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            t0 = time.perf_counter()
            sums = engine.train_epoch(epoch, progress=lambda e, i, n: marks.append(time.perf_counter()))
            done = time.perf_counter() - t0
        finally:
            if count_syncs:
                torch.cuda.set_sync_debug_mode("default")
    if count_syncs:
        sync_count = sum("synchroniz" in str(w.message) for w in caught)
    return np.asarray(sums), marks[-1] - t0, done, sync_count


def run_training(net: str, backend: str, batch: int, steps: int, epochs: int, input_shape: tuple[int, int, int],
                 precision: str = "fp32", seed: int = 0) -> dict[str, Any]:
    """``epochs`` epochs of ``steps`` steps of one engine on ``learnable_splits``: the mean loss
    per epoch, whether it fell, where the data live, dispatch against completion per epoch."""
    from benchmarks.throughput import Case, build_engine
    from flaxnets.registry import get_spec

    case = Case(net, batch, input_shape, steps, precision)
    splits = learnable_splits(net, batch, steps, input_shape, seed)
    t0 = time.perf_counter()
    engine = build_engine(backend, case, splits, get_spec(net).num_classes, seed)
    build = time.perf_counter() - t0
    losses, dispatch, done, syncs = [], [], [], []
    for ep in range(epochs):
        sums, d, c, s = timed_epoch(engine, ep)
        losses.append(float(sums[:, 0].sum() / engine.examples))
        dispatch.append(d)
        done.append(c)
        syncs.append(s)
    # the first epoch compiles torch.compile's graphs or warms caches: the later ones are the loop
    later = slice(1, None) if epochs > 1 else slice(None)
    frac = statistics.median(d / c for d, c in zip(dispatch[later], done[later]))
    return {"net": net, "backend": backend, "batch": batch, "steps_per_epoch": steps, "epochs": epochs,
            "input": list(input_shape), "precision": precision, "build_seconds": build,
            "epoch_loss": losses, "loss_fell": losses[-1] < losses[0],
            "data_device": _data_device(engine), "dispatch_seconds": dispatch, "completion_seconds": done,
            "dispatch_fraction": frac, "torch_syncs_per_epoch": syncs}


# --------------------------------------------------------------------------- the report
def _e(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:.1e}"


def format_markdown(rep: dict[str, Any]) -> str:
    """The report's markdown: the machine, then parity, throughput and training tables."""
    d = rep["device"]
    where = (f"JAX on {d['jax_backend']} ({d['jax_device_kind']}), torch on {d['torch_device']} "
             f"({d['torch_device_name']})")
    det = rep["env"]["deterministic"]
    lines = [f"`python scripts/accel_check.py{' ' + ' '.join(rep['argv']) if rep['argv'] else ''}`: {where}; "
             f"{rep['machine']['cpu']}, {rep['machine']['cores']} cores; jax {rep['machine']['versions']['jax']}, "
             f"torch {rep['machine']['versions']['torch']}; {rep['wall_seconds']:.0f} s"
             f"{', deterministic' if det else ''}{', quick sizes' if rep['quick'] else ''}.", ""]
    par = rep.get("parity")
    if par:
        tol = par["tolerances"]
        lines += [f"Parity (`parity.check_net`; eval logits ≤ {tol['logits_rtol']:.0e} relative, float64 "
                  f"gradients ≤ {tol['grad_rtol']:.0e}; \"default\": each framework's own float32 precision, "
                  f"\"f32\": JAX `highest`, torch IEEE float32 matmuls and convs):", "",
                  "| net | eval logits Δ default / f32 | train f32 error, JAX / torch (f32) | grads Δ (f64) "
                  "| BN stats Δ (f32) | default | f32 |", "|---|---:|---:|---:|---:|---|---|"]
        by = {(r["net"], r["mode"]): r for r in par["rows"]}
        for net in dict.fromkeys(r["net"] for r in par["rows"]):
            dflt, f32 = by.get((net, "default")), by.get((net, "f32"))
            ref = f32 or dflt
            lines.append(f"| {net} | {_e(dflt and dflt['logits_delta'])} / {_e(f32 and f32['logits_delta'])} | "
                         f"{_e(ref['train_f32_error'])} / {_e(ref['torch_f32_error'])} | "
                         f"{_e(ref['grads_delta_f64'])} | {_e(ref['bn_stats_delta'])} | "
                         f"{'—' if not dflt else 'PASS' if dflt['ok'] else 'FAIL'} | "
                         f"{'—' if not f32 else 'PASS' if f32['ok'] else 'FAIL'} |")
        lines += ["", f"Full-float32 parity: {'PASS' if par['ok'] else 'FAIL'}.", ""]
    tp = rep.get("throughput")
    if tp:
        pk = rep["peaks"]
        lines += ["Training-step throughput, img/s (median of the timed rounds; "
                  + "; ".join(f"{p} matmul peak {pk[p]['peak_flops'] / 1e12:.2f} TFLOP/s ({pk[p]['peak_from']}, "
                              f"n={pk[p]['n']})" for p in pk) + "):", "",
                  "| net | input | batch | precision | JAX | torch | torch.compile | JAX ÷ torch | "
                  "JAX ÷ compile | bf16 ÷ fp32, JAX | % of peak, JAX / best torch | compile s, JAX / TC |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in tp:
            head = f"| {row['net']} | {'×'.join(map(str, row['input']))} | {row['batch']} | {row['precision']} |"
            if row["status"] != "ok":
                lines.append(f"{head} {row['status']} |" + " |" * 7)
                continue
            pct = row["percent_of_peak"]
            best_t = max((pct[v] for v in pct if v != "jax"), default=None)
            vs = row["variants"]
            comp = [vs.get(v, {}).get("compile_seconds") for v in ("jax", "torch_compile")]
            bf = row.get("bf16_over_fp32", {}).get("jax")
            cells = " | ".join(variant_cell(vs[v]) if v in vs else "not run" for v in VARIANTS)
            lines.append(f"{head} {cells} | "
                         f"{num(row['jax_over_best_eager'], '.2f', '×')} | "
                         f"{num(row['jax_over_torch_compile'], '.2f', '×')} | "
                         f"{num(bf, '.2f', '×')} | {num(pct.get('jax'), '.1f')} / {num(best_t, '.1f')} | "
                         f"{num(comp[0], '.1f')} / {num(comp[1], '.1f')} |")
        lines.append("")
    tr = rep.get("training")
    if tr:
        lines += ["Training on synthetic data held on the device (mean loss per epoch; dispatch: time to the "
                  "last step's progress callback, completion: to `train_epoch`'s return, medians after the "
                  "first epoch):", "",
                  "| framework | net | batch × steps | epochs | loss, first → last epoch | falls | data on | "
                  "dispatch ÷ completion | torch syncs per epoch |", "|---|---|---|---:|---|---|---|---:|---|"]
        for r in tr:
            syncs = [s for s in r["torch_syncs_per_epoch"] if s is not None]
            lines.append(f"| {r['backend']} | {r['net']} | {r['batch']} × {r['steps_per_epoch']} | {r['epochs']} | "
                         f"{r['epoch_loss'][0]:.3f} → {r['epoch_loss'][-1]:.3f} | "
                         f"{'yes' if r['loss_fell'] else 'NO'} | {r['data_device']} | {r['dispatch_fraction']:.2f} | "
                         f"{', '.join(map(str, syncs)) if syncs else '— (not CUDA)'} |")
        lines.append("")
    lines.append("Verdict: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in rep["verdict"].items()) + ".")
    return "\n".join(lines) + "\n"


def section_markers(kind: str) -> tuple[str, str]:
    """The docs/benchmarks.md markers around the latest table of ``kind`` ('gpu' or 'cpu')."""
    return f"<!-- accel-{kind}:begin -->", f"<!-- accel-{kind}:end -->"


def write_docs(md: str, kind: str, path: Path = DOCS) -> None:
    """Replace the text between ``kind``'s markers in ``path`` with ``md``; a file without exactly
    one pair is an error (``benchmarks.report.SectionError``) and is not touched."""
    path.write_text(replace_section(path.read_text(), md, str(path), section_markers(kind)))


# --------------------------------------------------------------------------- the check
def run_check(args: Any, argv: list[str], env: dict[str, Any]) -> dict[str, Any]:
    """The whole check as ``args`` asks (``scripts/accel_check.py``'s options); the JSON report."""
    from benchmarks.machine import machine_info

    start = time.perf_counter()
    deadline = start + args.budget
    rep: dict[str, Any] = {"argv": argv, "quick": args.quick, "env": env,
                           "torch": torch_setup(env["deterministic"]), "machine": machine_info(),
                           "device": device_info()}
    rep["default_precision"] = torch_precision_settings()
    log(f"JAX on {rep['device']['jax_backend']} ({rep['device']['jax_device_kind']}), torch on "
        f"{rep['device']['torch_device']}; budget {args.budget:.0f} s")
    verdict: dict[str, bool] = {}
    if args.parity_nets:
        rep["parity"] = run_parity(tuple(args.parity_nets), rep["device"]["torch_device"])
        verdict["parity (full f32)"] = rep["parity"]["ok"]
    if args.train_net:
        side = QUICK_IMAGE if args.quick else ACCEL_IMAGE
        from flaxnets.registry import get_spec

        spec = get_spec(args.train_net)
        shape = (side, side, 3) if spec.any_size else spec.input_shape
        rep["training"] = []
        for backend in ("jax", "torch"):
            log(f"training {args.train_net} ({backend}): {args.train_epochs} epochs of {args.train_steps} steps")
            r = run_training(args.train_net, backend, args.train_batch, args.train_steps, args.train_epochs, shape)
            log(f"  loss {' → '.join(f'{x:.3f}' for x in r['epoch_loss'])}; data on {r['data_device']}; "
                f"dispatch ÷ completion {r['dispatch_fraction']:.2f}")
            rep["training"].append(r)
        verdict["loss falls"] = all(r["loss_fell"] for r in rep["training"])
    if args.nets:
        precisions = tuple(args.precisions)
        rep["peaks"] = {}
        for p in precisions:
            log(f"matmul peak {p}, n={args.peak_size}")
            rep["peaks"][p] = matmul_peak(args.peak_size, precision=p, device=default_torch_device())
        cases = throughput_cases(tuple(args.nets), precisions, args.quick, args.large, args.steps)
        settings = Settings(steps=args.steps, repeats=args.repeats, warmup=1, round_seconds=args.round_seconds,
                            settle=args.settle, compile_timeout=args.compile_timeout)
        rep["settings"] = vars(settings)
        rep["throughput"] = run_throughput(cases, tuple(args.variants), rep["peaks"], settings, deadline,
                                           None if "all" in args.compile_nets else tuple(args.compile_nets))
        ran = [r for r in rep["throughput"] if r["status"] == "ok"]  # the others: past the budget
        verdict["throughput measured"] = bool(ran) and all(
            v["status"] == "ok" for r in ran for v in r["variants"].values())
    rep["verdict"] = verdict
    rep["wall_seconds"] = time.perf_counter() - start
    rep["machine"]["loadavg_end"] = os.getloadavg()
    return rep


def save(rep: dict[str, Any], out: Path) -> tuple[Path, Path, str]:
    """Write ``accel.json`` and ``accel.md`` into ``out``; (json path, md path, markdown)."""
    out.mkdir(parents=True, exist_ok=True)
    md = format_markdown(rep)
    jp, mp = out / "accel.json", out / "accel.md"
    jp.write_text(json.dumps(rep, indent=1, default=_jsonable))
    mp.write_text(md)
    return jp, mp, md


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def docs_kind(rep: dict[str, Any]) -> str:
    """Which docs table a report fills: 'cpu' when JAX runs on the CPU, else 'gpu' (a TPU's too)."""
    return "cpu" if rep["device"]["jax_backend"] == "cpu" else "gpu"


def main_with(argv: list[str], parse: Callable[[list[str]], Any]) -> int:
    """Run the check for ``argv`` (parsed by ``parse``), write the report; 0 when every verdict passed."""
    args = parse(argv)
    env = accelerator_env(not args.no_determinism)
    rep = run_check(args, argv, env)
    jp, mp, md = save(rep, Path(args.out))
    print(md)
    log(f"wrote {jp} and {mp}")
    if args.write_docs:
        write_docs(md, docs_kind(rep), Path(args.write_docs))
        log(f"updated the {docs_kind(rep)} table of {args.write_docs}")
    return 0 if all(rep["verdict"].values()) else 1
