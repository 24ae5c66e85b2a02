"""Benchmark JAX against PyTorch training on this machine; the benchmark itself is ``benchmarks``.

python scripts/bench.py [--nets lenet resnet20] [--batch B] [--steps N] [--no-e2e] [--out bench.json]
python scripts/bench.py --help    # every flag

``benchmarks`` is imported as an installed package, like ``flaxnets`` (the editable install of
the checkout provides both), so this script runs from any working directory.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from flaxnets.host_malloc import run_under_tcmalloc

    run_under_tcmalloc()  # both frameworks on the allocator training runs on (host_malloc.py)
    from benchmarks.cli import main

    sys.exit(main())
