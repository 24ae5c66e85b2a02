"""Train-step throughput of JAX and PyTorch, measured in one process, the variants interleaved.

What is timed is what training runs: the engines of ``fit`` (``JaxEngine``, ``TorchEngine``)
built on synthetic uint8 data of the net's input shape, over ``engine.train_epoch`` with a train
set of exactly ``steps`` batches, so per-step overheads count.
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.flops import TRAIN_OVER_FORWARD, forward_flops
from flaxnets.registry import get_spec

if TYPE_CHECKING:
    from flaxnets.fit import Splits

VARIANTS = ("jax", "torch", "torch_cl", "torch_compile")
ABLATED = "jax_without"  # the JAX engine traced without the speed-ups named by --without
LABELS = {"jax": "JAX", "torch": "torch", "torch_cl": "torch-CL", "torch_compile": "torch.compile",
          ABLATED: "JAX without"}
EAGER = ("torch", "torch_cl")  # the PyTorch variants JAX is compared with (best of them)

# Sized for a 10-minute default run on an idle 2-core CPU (estimated from CPU times): the
# recipe's batch for the small nets, smaller ones for the deep ResNets, DenseNets at 32x32.
DEFAULT_BATCH = {"resnet56": 64, "resnet110": 32, "resnet1202": 8, "densenet121": 16,
                 "densenet169": 16, "densenet201": 16, "densenet121_se": 16}
DEFAULT_IMAGE = 32  # side of the square input of the any-size nets (the DenseNets)


@dataclass(frozen=True)
class Case:
    """One net as benchmarked: batch size, input shape (H, W, C), steps per timed epoch and
    compute precision (``Recipe.precision``)."""

    net: str
    batch: int
    input_shape: tuple[int, int, int]
    steps: int
    precision: str = "fp32"


def make_case(net: str, steps: int, batch: int | None = None, image: int | None = None,
              precision: str = "fp32") -> Case:
    """The benchmark case of ``net``: its default batch and input unless overridden."""
    from flaxnets.recipes import recipe_for

    spec = get_spec(net)
    h, w, c = spec.input_shape
    if spec.any_size:
        h = w = image or DEFAULT_IMAGE
    return Case(net, batch or DEFAULT_BATCH.get(net, recipe_for(net).batch_size), (h, w, c), steps,
                precision)


def synthetic_splits(case: Case, num_classes: int, seed: int = 0) -> Splits:
    """Random uint8 images and labels: ``steps`` full batches to train on, one image to test on."""
    from flaxnets.fit import Splits

    rng = np.random.default_rng(seed)
    n = case.batch * case.steps
    x = rng.integers(0, 256, (n, *case.input_shape), dtype=np.uint8)
    y = rng.integers(0, num_classes, n).astype(np.int32)
    return Splits(x, y, x[:1], y[:1])


class CompileTimeout(Exception):
    """torch.compile's first epoch ran past the time limit."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise CompileTimeout in the main thread after ``seconds`` (no limit if None)."""
    if not seconds:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise CompileTimeout(f"not compiled within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def build_engine(variant: str, case: Case, splits: Splits, num_classes: int, seed: int,
                 without: tuple[str, ...] = ()) -> Any:
    """The training engine of ``variant`` for ``case``, exactly as ``fit`` would build it
    (``ABLATED``: the JAX engine traced without the speed-ups ``without``)."""
    from flaxnets import xla_cpu
    from flaxnets.engine import JaxEngine
    from flaxnets.recipes import recipe_for

    recipe = recipe_for(case.net, batch_size=case.batch, precision=case.precision)
    if variant in ("jax", ABLATED):
        with xla_cpu.without(*(without if variant == ABLATED else ())):  # its steps compile here
            return JaxEngine(case.net, splits, num_classes, recipe, seed)
    from torch_ref.engine import TorchEngine

    engine = TorchEngine(case.net, splits, num_classes, recipe, seed, channels_last=variant == "torch_cl")
    if variant == "torch_compile":
        import torch

        # Wraps the engine's own model (the optimiser keeps the same parameters); compiled
        # lazily, so the first epoch pays for it.
        engine.model = torch.compile(engine.model)
    return engine


def _cause(e: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """``e`` or the first exception of type ``kind`` in its chain of causes, else None."""
    while e is not None and not isinstance(e, kind):
        e = e.__cause__ or e.__context__
    return e


def _error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def epochs_per_round(warmup_seconds: list[float], round_seconds: float) -> int:
    """Epochs each variant trains back to back in a timed round: enough that the fastest
    variant's round lasts ``round_seconds`` (from its last warm-up epoch), at least one."""
    fastest = min(warmup_seconds, default=0.0)
    return max(1, math.ceil(round_seconds / fastest)) if fastest > 0 else 1


def measure_case(case: Case, variants: tuple[str, ...] = VARIANTS, repeats: int = 3, warmup: int = 1,
                 compile_timeout: float | None = 120.0, seed: int = 0, without: tuple[str, ...] = (),
                 round_seconds: float = 0.0, settle: int = 0,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Time ``train_epoch`` of each variant's engine, interleaved (J, T, T-CL, TC, J, ...).

    The first ``warmup`` rounds are not counted; a variant that fails (or whose torch.compile
    epoch exceeds ``compile_timeout`` s) is reported with its status and dropped from the rounds.
    A timed round trains ``epochs_per_round`` epochs of a variant back to back (``seconds`` holds
    its time per epoch), after ``settle`` untimed ones: the first steps after another variant ran
    are slow (its threads still spin, the caches hold its data), which training, running one
    engine, never sees; a round of a few short epochs measured mostly that.
    """
    if warmup < 1:
        raise ValueError("at least one warm-up round: it is where torch.compile compiles")
    num_classes = get_spec(case.net).num_classes
    splits = synthetic_splits(case, num_classes, seed)
    res: dict[str, dict[str, Any]] = {v: {"status": "ok", "warmup_seconds": [], "seconds": []}
                                      for v in variants}
    engines: dict[str, Any] = {}

    def drop(v: str, status: str) -> None:
        res[v]["status"] = status
        engines.pop(v, None)
        log(f"  {case.net} {LABELS[v]}: {status}")
        if v == "torch_compile" and "torch._dynamo" in sys.modules:
            sys.modules["torch._dynamo"].reset()  # forget the half-built graphs

    for v in variants:
        t0 = time.perf_counter()
        try:
            engines[v] = build_engine(v, case, splits, num_classes, seed, without)
        except Exception as e:  # reported per variant; the other variants still run
            drop(v, f"failed: {_error(e)}")
            continue
        res[v]["build_seconds"] = time.perf_counter() - t0
        if v in ("jax", ABLATED):
            res[v]["compile_seconds"] = engines[v].compile_seconds  # train, eval, permutation
    per_round, epoch = 1, 0
    for rnd in range(warmup + repeats):
        if rnd == warmup:
            per_round = epochs_per_round([res[v]["warmup_seconds"][-1] for v in engines], round_seconds)
        epochs, warm = (1, 0) if rnd < warmup else (per_round, settle)
        timed = epoch + warm  # every variant trains the same epoch numbers in a round
        for v in list(engines):
            limit = compile_timeout if v == "torch_compile" and rnd == 0 else None
            try:
                with time_limit(limit):
                    for ep in range(epoch, timed):
                        engines[v].train_epoch(ep)
                    t0 = time.perf_counter()
                    for ep in range(timed, timed + epochs):
                        engines[v].train_epoch(ep)
                    dt = (time.perf_counter() - t0) / epochs
            except Exception as e:
                timeout = _cause(e, CompileTimeout)  # inductor re-raises it wrapped
                drop(v, f"timeout: {timeout}" if timeout else f"failed: {_error(e)}")
                continue
            res[v]["warmup_seconds" if rnd < warmup else "seconds"].append(dt)
        epoch = timed + epochs
    images = case.batch * case.steps
    for v, r in res.items():
        if r["status"] == "ok":
            r["images_per_s"] = [images / s for s in r["seconds"]]
            r["median_images_per_s"] = images / statistics.median(r["seconds"])
    tc = res.get("torch_compile")
    if tc and tc["status"] == "ok":  # the first epoch minus a steady one
        tc["compile_seconds"] = max(0.0, tc["warmup_seconds"][0] - statistics.median(tc["seconds"]))
    return {"net": case.net, "batch": case.batch, "input": list(case.input_shape),
            "steps": case.steps, "precision": case.precision, "epochs_per_round": per_round, "variants": res}


def summarise(row: dict[str, Any], peak_flops: float) -> dict[str, Any]:
    """Add FLOPs per image and step, JAX / best eager PyTorch and each variant's % of the peak."""
    fwd = forward_flops(row["net"], tuple(row["input"]))
    row["forward_flops_per_image"] = fwd
    row["train_flops_per_image"] = TRAIN_OVER_FORWARD * fwd
    row["train_flops_per_step"] = TRAIN_OVER_FORWARD * fwd * row["batch"]
    ips = {v: r["median_images_per_s"] for v, r in row["variants"].items() if r["status"] == "ok"}
    row["percent_of_peak"] = {v: 100 * x * TRAIN_OVER_FORWARD * fwd / peak_flops for v, x in ips.items()}
    best = max((v for v in EAGER if v in ips), key=ips.get, default=None)
    row["jax_over_best_eager"] = paired_ratio(row, best)
    row["jax_over_ablated"] = paired_ratio(row, ABLATED if ABLATED in ips else None)
    return row


def paired_ratio(row: dict[str, Any], other: str | None) -> float | None:
    """JAX's speed over variant ``other``: the median over rounds of other's epoch time / JAX's
    in the same round. Paired, because a shared 2-core machine's speed drifts by 20-30 % between
    rounds a minute apart and both variants of a round see the same drift (with one round it is the
    ratio of the medians)."""
    vs = row["variants"]
    if other is None or vs.get("jax", {}).get("status") != "ok":
        return None
    return statistics.median(o / j for o, j in zip(vs[other]["seconds"], vs["jax"]["seconds"]))
