"""Check that every Flax net computes what its torch twin computes: python scripts/parity.py --net all."""

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
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--net", default="all", help=f"a net name or 'all' ({', '.join(list_nets())})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and batch")
    p.add_argument("--batch", type=int, default=2, help="batch size of the check")
    args = p.parse_args(argv)
    names = list_nets() if args.net == "all" else [args.net]
    try:
        for n in names:
            get_spec(n)
    except UnknownNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

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
