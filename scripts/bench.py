"""Benchmark JAX against PyTorch training on this machine; the benchmark itself is ``benchmarks``.

python scripts/bench.py [--nets lenet resnet20] [--batch B] [--steps N] [--no-e2e] [--out bench.json]
python scripts/bench.py --help    # every flag

``benchmarks`` is imported as an installed package, like ``flaxnets`` (the editable install of
the checkout provides both), so this script runs from any working directory.
"""

from __future__ import annotations

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
