"""The note's corr2d exercise in JAX: learn the (1, 2) edge kernel from the 6x8 image and its edges."""

from __future__ import annotations

import argparse
import sys

from flaxnets.exercises import format_fit, learn_edge_kernel


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the exercise and print the note's lines."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20, help="gradient steps (note: 20)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (note: 0.01)")
    p.add_argument("--seed", type=int, default=0, help="JAX seed of the N(0, 1) start")
    p.add_argument("--init-from-torch-seed", type=int, default=None, metavar="S",
                   help="start from what torch.randn draws for the note's Conv2D after manual_seed(S)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.lr <= 0:
        p.error("--steps must be >= 1 and --lr > 0")
    fit = learn_edge_kernel(a.steps, a.lr, a.seed, torch_seed=a.init_from_torch_seed)
    print(format_fit(fit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
