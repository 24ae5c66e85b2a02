"""Per-net XLA:CPU compile options, kept where a paired A/B of the whole step measured a gain."""

from __future__ import annotations

from typing import Any

from flaxnets.xla_cpu.switch import speedup_on

# XLA:CPU compile options of a net's steps where they measured faster than XLA's defaults
# (2-core Xeon, jax 0.10.2, the same step compiled both ways and timed in one process). Without
# YNN library fusions (dots and reductions then go to XLA's own emitters), lenet: 1.15x median
# over 40 alternating rounds of 8 steps (IQR 1.08-1.19x, faster in 98% of rounds; single
# interleaved runs said 0.95-1.20x, this machine drifts). The same for the others (24 rounds):
# dilated 0.94x, net 0.99x, net_width 0.92x, net_dropout 0.97x, net_batchnorm 0.54x; resnet20
# 0.95x (one run): only lenet takes it. (On lenet, on top of it: oneDNN 1.02x, no XNNPACK 1.00x,
# the concurrency-optimised scheduler 1.00x: not taken.)
# 512-bit vectors in XLA's own loops (its default is 256 even where AVX-512 is there), for the
# CIFAR-2 nets, whose steps are mostly such loops (the first conv's tap sum, tanh, pools,
# BatchNorm): net 1.13x (IQR 1.05-1.20, faster in 83% of 12 rounds of 10 steps), net_width 1.10x
# (1.08-1.12, 90% of 10), net_dropout 1.17x (1.04-1.22, 75% of 12), net_batchnorm 1.30x
# (1.25-1.46, 100% of 12); nothing for lenet 0.99x, dilated 0.97x, resnet20 0.99x, densenet121
# 1.00x. A preference, not a demand: capped at AVX2 (xla_cpu_max_isa) a small function compiled
# with it gave the same numbers.
_WIDE_VECTORS = {"xla_cpu_prefer_vector_width": 512}
# XLA's own convolutions instead of YNNPACK's (which XLA:CPU hands 2-D f32 convs of more than 16
# channels by default; YNN keeps the dots and reductions; a compile option takes the enum set, not
# the flag's -individual_convolution): paired in one `bench.py --without cpu_compile_options` run
# on a 2-core AMD EPYC, resnet20 1.12x, resnet56 1.29x, net_width 1.22x (with its wide vectors);
# net, whose convs have 16 channels, gains nothing. Every figure: docs/cpu_speedups.md.
_XLA_CONVS = {"xla_cpu_experimental_ynn_fusion_type":
              "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
CPU_COMPILE_OPTIONS: dict[str, dict[str, Any]] = {
    "lenet": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "net": _WIDE_VECTORS,
    **{name: {**_WIDE_VECTORS, **_XLA_CONVS} for name in ("net_width", "net_dropout", "net_batchnorm")},
    **{f"resnet{d}": _XLA_CONVS for d in (20, 32, 44, 56, 110)},
}


def compile_options(name: str, backend: str) -> dict[str, Any]:
    """The XLA compile options of net ``name``'s train and eval steps on ``backend``."""
    if backend != "cpu" or not speedup_on("cpu_compile_options"):
        return {}
    return dict(CPU_COMPILE_OPTIONS.get(name, {}))
