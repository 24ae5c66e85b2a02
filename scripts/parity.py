"""Check that every Flax net computes what its torch twin computes: python scripts/parity.py --net all.

With --train-steps N, check instead that both frameworks train net NAME the same way: N optimiser
steps of its recipe from the same weights on the same batches, every tensor compared after each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flaxnets.registry import UnknownNetError, get_spec, list_nets

# Run as ``python scripts/NAME.py``, Python puts scripts/ first on sys.path, and scripts/parity.py
# would then hide the parity package: take that entry off (the packages are installed).
if __name__ == "__main__" and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]


def main(argv: list[str] | None = None) -> int:
    """Print one row per net (logits, BN statistics, gradients, round trip) and a pass/fail count."""
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="exit status: 0 if every check passed, 1 if any failed (their details are printed), "
               "2 for a usage error (an unknown net or a bad number).")
    p.add_argument("--net", default="all",
                   help=f"a net name, or 'all' (the default), which checks all {len(list_nets()) + 1} "
                        f"nets (the {len(list_nets())} registered ones and torchvision's densenet121) "
                        f"in about ten minutes on a 2-core CPU; nets: {', '.join(list_nets())}")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed of the random weights and batch (0 to {2**32 - 1}; default 0)")
    p.add_argument("--batch", type=int, help="batch size of the check (at least 1; default 2, with "
                                             "--train-steps the recipe's)")
    p.add_argument("--train-steps", type=int, metavar="N",
                   help="training parity of one net: N optimiser steps in float64 (float32 beside), "
                        "one row per step; exit 1 naming the first step and tensor off by more than "
                        "the tolerance (docs/parity_training.md)")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    if args.train_steps is not None and args.train_steps < 1:
        p.error(f"--train-steps must be at least 1, got {args.train_steps}")
    if args.train_steps is not None and args.net == "all":
        p.error("--train-steps checks one net: pass --net NAME")
    if not 0 <= args.seed < 2**32:  # numpy's RandomState draws the batch
        p.error(f"--seed must be between 0 and {2**32 - 1}, got {args.seed}")
    names = list_nets() if args.net == "all" else [args.net]
    try:
        for n in names:
            get_spec(n)
    except UnknownNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.train_steps is not None:
        from parity.training import check_training

        res = check_training(args.net, args.train_steps, seed=args.seed, batch=args.batch)
        print(res.table())
        return 0 if res.ok else 1

    args.batch = args.batch or 2
    from parity.check import check_net, check_torchvision_densenet121
    from parity.report import HEADER, TOLERANCES, details, row

    print(TOLERANCES)
    print(HEADER, flush=True)
    results, start = [], time.time()
    for n in names:
        results.append(check_net(n, seed=args.seed, batch=args.batch))
        print(row(results[-1]), flush=True)
    if "densenet121" in names:
        results.append(check_torchvision_densenet121(seed=args.seed, batch=args.batch))
        print(row(results[-1]), flush=True)
    failed = [r for r in results if not r.ok]
    for r in failed:
        for line in details(r):
            print(line)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed in {time.time() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
