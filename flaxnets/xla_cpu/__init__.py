"""XLA:CPU speed-ups of the layers: the same functions in forms XLA:CPU runs faster.

Each layer of ``flaxnets.layers`` calls into this package at one place (convs through
``conv_general_dilated``, BatchNorm through ``batch_norm_train``, pools through ``pool``,
``BlockStack`` through ``unrolled_stage`` and ``loop_body``) and gets XLA's own form back off the
CPU or where no rule applies. ``SPEEDUPS`` names every speed-up and ``without(...)`` turns some
off while a step is traced, so a benchmark can measure each (``scripts/bench.py --without NAME``).
"""

from flaxnets.xla_cpu.batch_norm import batch_norm_train
from flaxnets.xla_cpu.compile_options import CPU_COMPILE_OPTIONS, compile_options
from flaxnets.xla_cpu.conv import conv_general_dilated
from flaxnets.xla_cpu.pool import pool
from flaxnets.xla_cpu.stages import unrolled_stage
from flaxnets.xla_cpu.switch import SPEEDUPS, in_loop_body, loop_body, speedup_on, without

__all__ = ["CPU_COMPILE_OPTIONS", "SPEEDUPS", "batch_norm_train", "compile_options", "conv_general_dilated",
           "in_loop_body", "loop_body", "pool", "speedup_on", "unrolled_stage", "without"]
