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
# with oneDNN's, unrolled against scanned (`bench.py --without unrolled_stages`, 2-core AMD EPYC):
# resnet32 1.23x (381 / 309 img/s, compile 3.6 / 5.3 s), resnet56 at batch 64 1.10x (191 / 174,
# 6.5 / 7.7 s), resnet110 at batch 32 1.06x (79 / 80 img/s medians, compile 12.4 / 8.0 s). Up to
# resnet110's 17; resnet1202's 199 scan (unrolled, with XLA's convs, its step did not compile
# in 16.5 minutes).
UNROLLED_MAX_BLOCKS = 17
