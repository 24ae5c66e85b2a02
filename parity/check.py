"""Prove each registered Flax net and its torch twin compute the same function, and say where not.

``check_net`` draws random torch weights (BatchNorm statistics included, so eval mode is not
an identity), converts them, checks the parameter count and output shape against the registry,
runs ``parity.comparison.compare`` (eval logits, train-mode logits + updated BN statistics after one
forward, cross-entropy gradients of every parameter, the first divergent layer) and the
torch -> flax -> torch round trip. The comparison's helpers and tolerances live in
``parity.comparison`` and are re-exported here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

import flaxnets
import torch_ref
from flaxnets.introspect import count_params
from parity.comparison import (BN_STAT_KEYS, F32_ERROR_RATIO, GRAD_RTOL, LOGIT_RTOL, CompareReport, EvalLogits,
                            LayerDelta, compare, compare_eval_logits, first_divergence, flax_logits,
                            grad_rel_delta, layer_deltas, nchw_to_nhwc, scaled_delta)
from parity.convert import flax_to_torch, torch_to_flax

__all__ = ["BN_STAT_KEYS", "F32_ERROR_RATIO", "GRAD_RTOL", "LOGIT_RTOL", "CompareReport", "EvalLogits",
           "LayerDelta", "ParityResult", "check_net", "check_torchvision_densenet121", "compare",
           "compare_eval_logits", "first_divergence", "flax_logits", "grad_rel_delta", "layer_deltas",
           "nchw_to_nhwc", "randomize_torch", "scaled_delta"]


def randomize_torch(model: torch.nn.Module, seed: int, input_shape: tuple[int, int, int]) -> None:
    """Give BatchNorm random affine parameters and data-calibrated running statistics.

    With fresh statistics (0, 1) eval-mode BN is nearly an identity and would hide a
    conversion error; with random ones the activations of a 1202-layer ResNet overflow to
    inf in eval mode. So the statistics are those of one train-mode forward of random data
    (momentum 1 for that pass), which differ per channel and keep every depth finite.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    h, w, c = input_shape
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.momentum = 1.0
        was_training = model.training
        model.train()
        model(torch.randn(4, c, h, w, generator=g))
        model.train(was_training)
        for m in bns:
            m.momentum = 0.1
            m.num_batches_tracked.fill_(int(torch.randint(0, 1000, (1,), generator=g)))


# --------------------------------------------------------------------------- the check
@dataclass
class ParityResult:
    """Everything ``check_net`` measured for one net."""

    name: str
    expected_params: int | None  # None: not a registry configuration, only torch == flax counts
    torch_params: int = 0
    flax_params: int = 0
    output_shape: tuple[int, ...] = ()
    expected_shape: tuple[int, ...] = ()
    logits_delta: float = float("nan")
    train_logits_delta: float = float("nan")  # float64 on both sides: the conversion
    train_f32_error: float = float("nan")  # Flax float32 vs the float64 logits
    torch_f32_error: float = float("nan")  # torch float32 vs the float64 logits
    bn_stats_delta: float = float("nan")
    grads_delta: float = float("nan")
    worst_grad: str = ""
    roundtrip_exact: bool = False
    divergence: LayerDelta | None = None
    failures: list[str] = field(default_factory=list)
    compare: CompareReport | None = None  # the logits/BN/gradient/divergence work, as measured

    @property
    def ok(self) -> bool:
        return not self.failures


def check_net(name: str, seed: int = 0, batch: int = 2, input_shape: tuple[int, int, int] | None = None,
              jit: bool | None = None, device: str | torch.device | None = None, **kw) -> ParityResult:
    """Run every parity check on net ``name`` with random weights; never raises on a mismatch,
    it records it in ``failures``. ``jit`` defaults to the registry's ``many_small_ops``;
    ``device``: where the torch side of the comparison runs (default the CPU)."""
    spec = flaxnets.get_spec(name)
    h, w, c = input_shape or spec.check_shape
    jit = spec.many_small_ops if jit is None else jit
    res = ParityResult(name, spec.params)
    torch.manual_seed(seed)
    tmodel = torch_ref.create(name, **kw)
    randomize_torch(tmodel, seed, (h, w, c))
    # cloned: the converted model must not alias the torch tensors the round trip is held against
    sd = OrderedDict((k, v.clone()) for k, v in tmodel.state_dict().items())
    fmodel = torch_to_flax(name, sd, **kw)

    res.torch_params = sum(p.numel() for p in tmodel.parameters())
    res.flax_params = count_params(fmodel)
    if kw:  # another architecture (e.g. option='B'): the registry count is not its count
        res.expected_params = None
    if res.torch_params != res.flax_params or res.expected_params not in (None, res.flax_params):
        res.failures.append(f"params torch {res.torch_params:,} flax {res.flax_params:,} "
                            f"registry {res.expected_params or '—'}")

    rng = np.random.RandomState(seed)
    x = rng.randn(batch, c, h, w).astype(np.float32)
    y = rng.randint(0, spec.num_classes, size=batch)
    # on copies: tmodel and fmodel stay as converted (and tmodel on the CPU)
    report = compare(tmodel, fmodel, x, y, jit=jit, device=device)
    res.compare = report
    res.output_shape, res.expected_shape = report.eval_logits.flax_out.shape, (batch, spec.num_classes)
    if res.output_shape != res.expected_shape or not report.eval_logits.same_shape:
        res.failures.append(f"output shape flax {res.output_shape} torch "
                            f"{report.eval_logits.torch_out.shape} expected {res.expected_shape}")
    if report.eval_logits.same_shape:
        res.logits_delta = report.logits_delta
    res.train_logits_delta, res.train_f32_error = report.train_logits_delta, report.train_f32_error
    res.torch_f32_error, res.bn_stats_delta = report.torch_f32_error, report.bn_stats_delta
    res.grads_delta, res.worst_grad = report.grads_delta, report.worst_grad
    res.divergence = report.first_divergence
    res.failures += [f for f in report.failures if not f.startswith("output shape")]

    # torch -> flax -> torch round trip, bit for bit
    back = flax_to_torch(fmodel)
    res.roundtrip_exact = list(sorted(back)) == list(sorted(sd)) and all(
        back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape and torch.equal(back[k], sd[k])
        for k in sd)
    if not res.roundtrip_exact:
        res.failures.append("torch→flax→torch round trip is not bit-exact")
    return res


def check_torchvision_densenet121(seed: int = 0, batch: int = 2, size: int = 64) -> ParityResult:
    """torchvision's own densenet121 ``state_dict`` (half its keys in the old ``norm.1`` style)
    converts into ``flaxnets`` densenet121 and gives torchvision's eval logits."""
    import torchvision

    res = ParityResult("densenet121 (torchvision)", flaxnets.get_spec("densenet121").params)
    torch.manual_seed(seed)
    tv = torchvision.models.densenet121(weights=None)
    randomize_torch(tv, seed, (size, size, 3))
    tv.eval()
    sd = OrderedDict()
    for i, (k, v) in enumerate(tv.state_dict().items()):
        old = k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2.")
        sd[old if i % 2 else k] = v  # published checkpoints spell DenseLayer children norm.1, conv.2
    fmodel = torch_to_flax("densenet121", sd)
    fmodel.eval()
    res.torch_params = sum(p.numel() for p in tv.parameters())
    res.flax_params = count_params(fmodel)
    if not res.torch_params == res.flax_params == res.expected_params:
        res.failures.append("parameter counts differ")
    x = np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)
    # jitted (many_small_ops): 12 s, eager 32 s
    logits = compare_eval_logits(tv, fmodel, x, flaxnets.get_spec("densenet121").many_small_ops)
    res.output_shape, res.expected_shape = logits.flax_out.shape, logits.torch_out.shape
    res.logits_delta = logits.delta
    if not logits.ok:
        res.failures.append(f"eval logits Δ {res.logits_delta:.2e} > {LOGIT_RTOL:.0e}")
    back = flax_to_torch(fmodel)
    res.roundtrip_exact = all(torch.equal(back[k], v) for k, v in tv.state_dict().items())
    if not res.roundtrip_exact:
        res.failures.append("flax_to_torch does not give torchvision's state_dict back")
    return res
