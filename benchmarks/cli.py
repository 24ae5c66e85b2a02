"""The benchmark's command line: ``python scripts/bench.py`` or ``python -m benchmarks``.

Measures the machine's matmul peak, each net's train-step throughput with every variant
(``benchmarks.throughput``), then LeNet end to end (``benchmarks.e2e``); writes the report as
JSON (``--out``) and prints its markdown tables (``benchmarks.report``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.e2e import end_to_end, missing_inputs
from benchmarks.flops import matmul_peak
from benchmarks.machine import machine_info
from benchmarks.report import format_table, variant_cell
from benchmarks.throughput import ABLATED, DEFAULT_IMAGE, LABELS, VARIANTS, make_case, measure_case, summarise
from flaxnets.recipes import PRECISIONS
from flaxnets.registry import list_nets
from flaxnets.xla_cpu.switch import SPEEDUPS

# A timed round trains a variant this long, back to back, after --settle untimed epochs. A
# variant's first steps after another one ran are slow, and rounds of one short epoch timed mostly
# those. JAX / torch-CL on machine B (docs/benchmarks.md), one 3-step epoch per round against
# 0.5 s rounds after one settling epoch: lenet 0.94x against 1.02-1.05x, dilated 0.83x against
# 1.02-1.08x, net_batchnorm 0.67x against 1.00-1.07x, densenet121 0.88x against 1.15-1.28x;
# the default run took 227 s with the former, 272 s with the latter.
ROUND_SECONDS = 0.5
DEFAULT_COMPILE = ("lenet",)  # a cold torch.compile took 1-2 minutes per net on a loaded 2-core CPU
# One net per kernel mix, JAX compilation being most of the time (wall time of a JaxEngine
# build on machine A: densenet121 68-120 s, densenet169 143 s, densenet201 213 s, resnet1202
# 108 s, resnet110 16 s). The deeper ResNets and the other DenseNets repeat the blocks of
# resnet20 and densenet121.
DEFAULT_NETS = ("lenet", "dilated", "net", "net_width", "net_dropout", "net_batchnorm", "resnet20",
                "densenet121")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of scripts/bench.py."""
    p = argparse.ArgumentParser(
        prog="scripts/bench.py",
        description="JAX against PyTorch training on this machine: train-step throughput of each "
                    "net, interleaved, with the FP32 matmul peak and FLOPs per step, then LeNet's "
                    "whole training run against the tutorial's own loop.")
    p.add_argument("--nets", nargs="+", default=list(DEFAULT_NETS),
                   help=f"nets to time: 'all' or some of: {', '.join(list_nets())} "
                        f"(default {' '.join(DEFAULT_NETS)})")
    p.add_argument("--batch", type=int, help="batch size for every net (default: per net, in the table)")
    p.add_argument("--steps", type=int, default=3,
                   help="training steps (batches) in one epoch of the throughput part (default 3)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds per variant; the table gives their medians (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds of one epoch per variant before the timed ones; "
                        "torch.compile compiles in the first (default 1, at least 1)")
    p.add_argument("--round-seconds", type=float, default=ROUND_SECONDS,
                   help="a timed round trains each variant for as many epochs back to back as make "
                        f"the fastest one's last this long (default {ROUND_SECONDS}; 0: one epoch)")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed epochs of a variant before each of its timed rounds, so that the "
                        "round starts as training does, not just after another variant (default 1)")
    p.add_argument("--image", type=int, help=f"side of the DenseNets' input (default {DEFAULT_IMAGE})")
    p.add_argument("--compile-nets", nargs="+", default=list(DEFAULT_COMPILE),
                   help="nets also timed with torch.compile: names, 'all' or 'none' "
                        f"(default {' '.join(DEFAULT_COMPILE)}; each compile takes minutes on 2 cores)")
    p.add_argument("--compile-timeout", type=float, default=120.0,
                   help="seconds torch.compile's first epoch may take before it is reported as a "
                        "timeout (default 120)")
    p.add_argument("--without", nargs="+", default=[], choices=sorted(SPEEDUPS), metavar="SPEEDUP",
                   help="also time the JAX engine without these speed-ups, interleaved (what each "
                        f"brings): {', '.join(sorted(SPEEDUPS))}")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS,
                   help="compute precision(s) of the training steps (Recipe.precision); each net is "
                        "measured at each, one after the other (default fp32)")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                   help="end-to-end LeNet runs after the throughput part: scripts/train.py with "
                        "--backend jax (twice) and torch, and the tutorial's loop (minutes; default on)")
    p.add_argument("--peak-size", type=int, default=2048,
                   help="matrix side of the FP32 matmul that measures the peak (default 2048)")
    p.add_argument("--torch-threads", type=int,
                   help="torch.set_num_threads for the throughput part (default: torch's own); on a "
                        "busy machine 1 avoids waits for descheduled OpenMP threads")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist",
                   help="directory of the FashionMNIST .gz IDX files the tutorial's loop reads "
                        "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default="bench.json",
                   help="path of the JSON report (default bench.json; kept runs go to benchmarks/results/)")
    args = p.parse_args(argv)
    args.nets = list_nets() if args.nets == ["all"] else args.nets
    args.compile_nets = {"all": list_nets(), "none": []}.get(" ".join(args.compile_nets), args.compile_nets)
    for n in args.nets + args.compile_nets:
        if n not in list_nets():
            p.error(f"unknown net {n!r}; valid: {', '.join(list_nets())}")
    for flag in ("steps", "repeats", "warmup", "torch_threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.round_seconds >= 0:  # also NaN
        p.error("--round-seconds must be 0 or more")
    if args.settle < 0:
        p.error("--settle must be 0 or more")
    if args.e2e and (missing := missing_inputs(Path(args.data_dir))):
        p.error(f"the end-to-end runs (--no-e2e leaves them out) need {', '.join(missing)}")
    return args


def run(args: argparse.Namespace, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure everything ``args`` asks for and return the report (what bench.json holds)."""
    t0 = time.perf_counter()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")}
    report: dict[str, Any] = {"machine": machine_info(), "settings": settings}
    report["peak"] = peak = matmul_peak(args.peak_size)
    log(f"peak FP32 matmul {peak['peak_flops'] / 1e9:.1f} GFLOP/s ({peak['peak_from']})")
    report["nets"] = []
    for net, precision in ((n, pr) for n in args.nets for pr in args.precision):
        case = make_case(net, args.steps, args.batch, args.image, precision)
        log(f"{net}: batch {case.batch}, input {case.input_shape}, {case.steps} steps, {precision}")
        variants = (VARIANTS if net in args.compile_nets else VARIANTS[:-1]) + ((ABLATED,) * bool(args.without))
        w0, c0 = time.perf_counter(), time.process_time()
        row = measure_case(case, variants, args.repeats, args.warmup, args.compile_timeout,
                           without=tuple(args.without), round_seconds=args.round_seconds,
                           settle=args.settle, log=log)
        row.update(wall_seconds=time.perf_counter() - w0, cpu_seconds=time.process_time() - c0)
        report["nets"].append(summarise(row, peak["peak_flops"]))
        cells = ", ".join(f"{LABELS[v]} {variant_cell(r)}" for v, r in row["variants"].items())
        log(f"  {net}: {cells} ({row['wall_seconds']:.0f} s, {row['cpu_seconds']:.0f} s CPU)")
    report["e2e"] = None
    if args.e2e:
        with tempfile.TemporaryDirectory(prefix="flaxnets-bench-") as tmp:
            report["e2e"] = end_to_end(Path(tmp), Path(args.data_dir), log=log)
    report["loadavg_end"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write the JSON report and print the markdown tables."""
    args = parse_args(argv)
    report = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"\nwrote {args.out} in {report['wall_seconds']:.0f} s")
    return 0
