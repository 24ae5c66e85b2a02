"""The benchmark: JAX against PyTorch training of the same nets on one machine.

- ``benchmarks.throughput``: train-step throughput of the engines ``fit`` trains with, the
  variants interleaved in timed rounds.
- ``benchmarks.flops``: each net's FLOPs per image and the machine's FP32 matmul peak.
- ``benchmarks.e2e``: LeNet's whole 5-epoch training run, ``scripts/train.py`` with each backend
  against the tutorial's own loop (``benchmarks/tutorial_lenet.py``).
- ``benchmarks.machine``: the CPU, thread settings and library versions of a run.
- ``benchmarks.report``: the markdown tables of one or more reports (``bench.json`` files), and
  the section of ``docs/benchmarks.md`` they fill.
- ``benchmarks.cli``: the command line, ``python -m benchmarks`` or ``python scripts/bench.py``.

Measured runs are kept in ``benchmarks/results/``, one JSON report (``--out``) each, named
``<cpu>-<cores>c-<YYYY-MM-DD>-<nets>.json``.
"""
