"""Benchmark JAX against PyTorch training on this machine (issue 6); the logic is flaxnets.bench.

python scripts/bench.py [--nets lenet resnet20] [--batch B] [--steps N] [--no-e2e] [--out bench.json]
"""

from __future__ import annotations

import sys

from flaxnets.bench import main

if __name__ == "__main__":
    sys.exit(main())
