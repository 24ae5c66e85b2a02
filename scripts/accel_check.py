"""The accelerator check: parity on the device, JAX vs torch vs torch.compile throughput in fp32
and bf16, a short training run per framework (``benchmarks.accel``).

PYTHONPATH=. python scripts/accel_check.py [--out DIR] [--write-docs docs/benchmarks.md]
PYTHONPATH=. python scripts/accel_check.py --quick     # small sizes, for the CPU (a few minutes)
PYTHONPATH=. python scripts/accel_check.py --help      # every option

Runs on whatever backend JAX sees, torch on CUDA when it has it. Writes DIR/accel.json and
DIR/accel.md and prints the markdown; exit status 0 when full-float32 parity passes, the losses
fall and every throughput case ran. Needs no install step and no tensorflow(-datasets).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

# benchmarks.accel imports no JAX at its top: accelerator_env sets XLA_FLAGS before JAX starts
from benchmarks import accel  # noqa: E402


def parse(argv: list[str]) -> Any:
    """The options; ``--quick`` changes the defaults of those not given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU sizes: tiny batches, 2 steps, DenseNet at 32x32, no large batch, "
                        "torch.compile for lenet only, small matmul peak")
    p.add_argument("--out", default="accel-check", help="directory for accel.json and accel.md")
    p.add_argument("--write-docs", metavar="FILE",
                   help="put the table into FILE's accelerator section (the CPU slot when JAX runs on the CPU)")
    p.add_argument("--parity-nets", nargs="*", default=list(accel.PARITY_NETS), help="none: skip parity")
    p.add_argument("--nets", nargs="*", default=list(accel.THROUGHPUT_NETS), help="throughput nets; none: skip")
    p.add_argument("--precisions", nargs="+", default=list(accel.PRECISIONS), choices=accel.PRECISIONS)
    p.add_argument("--variants", nargs="+", default=list(accel.VARIANTS), choices=accel.VARIANTS)
    p.add_argument("--compile-nets", nargs="+", default=None,
                   help="nets timed with torch.compile ('all'; default all, --quick: lenet)")
    p.add_argument("--large", action=argparse.BooleanOptionalAction, default=True,
                   help="time each net at a large batch too (never with --quick)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed epoch (default 10, --quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, --quick 2)")
    p.add_argument("--round-seconds", type=float, default=None, help="(default 0.5, --quick 0.2)")
    p.add_argument("--settle", type=int, default=None, help="untimed epochs per round (default 1)")
    p.add_argument("--compile-timeout", type=float, default=120.0, help="torch.compile's first epoch, s")
    p.add_argument("--peak-size", type=int, default=None, help="matmul side (default 8192, --quick 512)")
    p.add_argument("--train-net", default=None, help="net of the training run (default resnet20, --quick "
                                                    "lenet); 'none' skips it")
    p.add_argument("--train-batch", type=int, default=None, help="(default 128, --quick 32)")
    p.add_argument("--train-steps", type=int, default=None, help="steps per epoch (default 20, --quick 8)")
    p.add_argument("--train-epochs", type=int, default=None, help="(default 4, --quick 3)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no new throughput case starts (default 330, --quick 900)")
    p.add_argument("--no-determinism", action="store_true",
                   help="without --xla_gpu_deterministic_ops and torch's deterministic algorithms")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"compile_nets": ["lenet"] if q else ["all"], "steps": 2 if q else 10, "repeats": 2 if q else 3,
                "round_seconds": 0.2 if q else 0.5, "settle": 1, "peak_size": 512 if q else 8192,
                "train_net": "lenet" if q else "resnet20", "train_batch": 32 if q else 128,
                "train_steps": 8 if q else 20, "train_epochs": 3 if q else 4, "budget": 900.0 if q else 330.0}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.train_net == "none":
        args.train_net = None
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every verdict passed."""
    return accel.main_with(sys.argv[1:] if argv is None else argv, parse)


if __name__ == "__main__":
    sys.exit(main())
