"""Whether a stage of identical blocks runs unrolled on the CPU (``unrolled_stage``)."""

from __future__ import annotations

from flaxnets.xla_cpu.conv import onednn_convs_here
from flaxnets.xla_cpu.switch import speedup_on


def unrolled_stage(blocks: int) -> bool:
    """Whether ``blocks`` identical blocks, which ``BlockStack`` would scan, run faster unrolled:
    on the CPU where oneDNN runs the convs, up to UNROLLED_MAX_BLOCKS of them."""
    return speedup_on("unrolled_stages") and blocks <= UNROLLED_MAX_BLOCKS and onednn_convs_here()


# The scan stacks every block's residuals for the backward pass and slices them out again
# (dynamic-update-slice fusions: 32 + 9 ms of resnet56's ~390 ms step). With XLA's own convs
# unrolled stages ran no faster and compiled twice as long (docs/cpu_speedups.md#scanned_stages);
# with oneDNN's, unrolled against scanned, paired within each run (2-core AMD EPYC; the first run
# `bench.py --without scanned_stages` before this rule, the second `bench.py --nets resnet32
# resnet44 resnet56 resnet110 --without unrolled_stages`): resnet32 1.23x / 1.14x, resnet44
# 1.07x, resnet56 (batch 64) 1.10x / 1.09x, resnet110 (batch 32) 1.06x / 1.10x. Compile time
# falls up to resnet56 (7.1 -> 6.1 s) and rises for resnet110 (6.9 -> 12.5 s). Up to resnet110's
# 17; resnet1202's 199 scan (unrolled, with XLA's convs, its step did not compile in 16.5 minutes).
UNROLLED_MAX_BLOCKS = 17
