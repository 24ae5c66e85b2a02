"""Prove a PyTorch module and its Flax NNX twin compute the same function, and say where they do not.

``compare(torch_model, flax_model, x)`` takes any such pair whose Flax module paths mirror the
torch ones (stock layers or the project's, see ``parity.convert.RULES``) and holds it against the
parity tolerances: eval logits, train-mode logits and BatchNorm running statistics after one
forward, the cross-entropy gradient of every parameter (float64), the norm layers' eps. It names
the first layer whose output differs and the known traps behind a difference (BatchNorm's
momentum convention and biased variance). ``parity.check.check_net`` runs it on every registered
net, with the registry's own checks around it. The package exports the function under this
module's own name, so the module is callable: ``parity.compare(...)`` is ``compare(...)``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import textwrap
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from flaxnets.introspect import record_outputs
from parity.convert import check_state_dict, module_paths, to_numpy, to_numpy_state_dict, torch_only_keys

LOGIT_RTOL = 1e-5  # max|Δ| ≤ LOGIT_RTOL·max(1, max|logits|), CPU fp32
# Train-mode float32 logits: Flax's error against the float64 result may be this many times
# torch's own (or LOGIT_RTOL, whichever is larger). Batch statistics of deep DenseNets at batch 2
# amplify rounding: torch's float32 train logits are 8.3e-6 (densenet121) and 1.06e-5
# (densenet169) off its float64 ones, so float32 against float32 at LOGIT_RTOL tests rounding.
# Measured (batch 2, 2-core AMD EPYC): Flax's error / torch's 0.91, 1.07, 0.55 (densenet121,
# 169, 121_se); a one-pass E[x²]-E[x]² variance would be orders of magnitude off.
F32_ERROR_RATIO = 2.0
GRAD_RTOL = 1e-4  # per parameter: max|Δg| ≤ GRAD_RTOL·max|g|, see grad_rel_delta
BN_STAT_KEYS = ("running_mean", "running_var", "num_batches_tracked")
LABEL_SEED = 0  # compare's default labels: np.random.RandomState(LABEL_SEED).randint(classes, size=N)

# torch layers that read a 3-D tensor as (N, C, L), and those that read it as (N, L, C): the first
# of them to read a tensor of the input's shape says whether the Flax twin gets it transposed
CHANNELS_FIRST_1D = (torch.nn.Conv1d, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
                     torch.nn.MaxPool1d, torch.nn.AvgPool1d, torch.nn.AdaptiveAvgPool1d,
                     torch.nn.AdaptiveMaxPool1d, torch.nn.InstanceNorm1d)
CHANNELS_LAST_1D = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.RNNBase,
                    torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                    torch.nn.TransformerDecoderLayer)


# --------------------------------------------------------------------------- small helpers
def scaled_delta(a: np.ndarray, b: np.ndarray) -> float:
    """max|a-b| / max(1, max|a|), ``a`` the torch reference: one number to hold against LOGIT_RTOL."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))


def grad_rel_delta(g_torch: np.ndarray, g_flax: np.ndarray, floor: float) -> float:
    """max|Δg| / max(max|g_torch|, floor) for one parameter.

    ``floor`` (1e-6 of the largest gradient of the net) keeps parameters whose gradient is
    essentially zero on both sides from dividing rounding noise by ~0.
    """
    scale = max(float(np.max(np.abs(g_torch))) if g_torch.size else 0.0, floor)
    return float(np.max(np.abs(g_torch.astype(np.float64) - g_flax))) / scale if scale > 0 else 0.0


def torch_device(model: torch.nn.Module) -> torch.device:
    """The device holding ``model``'s first parameter or buffer (cpu for a model without tensors)."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if t is None else t.device


def _on(model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    """``x`` as a torch tensor on ``model``'s device (on the CPU the numpy memory itself)."""
    return torch.from_numpy(x).to(torch_device(model))


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    """A torch image batch (N, C, H, W) in Flax's layout (N, H, W, C)."""
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _reads_channels_first(model: torch.nn.Module, x: np.ndarray) -> bool:
    """Whether the first torch layer with a layout (``CHANNELS_FIRST_1D`` or ``CHANNELS_LAST_1D``)
    that reads a tensor of ``x``'s shape, in execution order, is a channels-first one."""
    x_t, verdict = _on(model, x), []

    def hook(m: torch.nn.Module, args: tuple) -> None:
        if not verdict and args and isinstance(args[0], torch.Tensor) and args[0].shape == x_t.shape:
            if isinstance(m, CHANNELS_FIRST_1D + CHANNELS_LAST_1D):
                verdict.append(isinstance(m, CHANNELS_FIRST_1D))

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x_t)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return bool(verdict and verdict[0])


def flax_input(x: np.ndarray, torch_model: torch.nn.Module) -> np.ndarray:
    """The Flax twin's input for the torch input ``x``, channels last where torch has them first.

    A 4-D batch is an NCHW image batch: NHWC. A 3-D float batch goes as (N, L, C) when the first
    torch layer with a layout to read a tensor of its shape is channels-first (Conv1d, BatchNorm1d,
    GroupNorm, a 1-D pool), as it is when that layer is channels-last (Linear, LayerNorm, an RNN,
    attention: (N, L, C) sequences) or there is none. Other ranks (token ids (N, L), features
    (N, F)) go as they are.
    """
    if x.ndim == 4:
        return nchw_to_nhwc(x)
    if x.ndim == 3 and np.issubdtype(x.dtype, np.floating) and _reads_channels_first(torch_model, x):
        return np.ascontiguousarray(np.transpose(x, (0, 2, 1)))
    return x


def _float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def _float64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def _dropout_off(tmodel: torch.nn.Module, fmodel: nnx.Module) -> None:
    """Disable dropout in train mode on both sides: their random streams cannot agree."""
    for m in tmodel.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    for _, m in nnx.iter_modules(fmodel):
        if isinstance(m, nnx.Dropout):
            m.deterministic = True


# --------------------------------------------------------------------------- layer-by-layer
def _capture_flax(model: nnx.Module, x: jax.Array, jit: bool = False) -> dict[str, Any]:
    """Every submodule's output by torch module path, from one call of ``model`` (eager, or
    jitted: DenseNet-121-SE at 64x64: 29 s eager, 8 s jitted on the 2-core CPU)."""
    classes = {type(m) for p, m in module_paths(model) if p}

    def run(model: nnx.Module, x: jax.Array) -> dict[str, Any]:
        paths = {id(m): p for p, m in module_paths(model) if p}
        with record_outputs(classes, paths) as captured:
            model(x)
        return dict(captured)

    return nnx.jit(run)(model, x) if jit else run(model, x)


def _capture_torch(model: torch.nn.Module, x: torch.Tensor) -> OrderedDict[str, np.ndarray]:
    """Every named submodule's output (cloned: DenseNet's in-place ReLUs overwrite them)."""
    captured: OrderedDict[str, np.ndarray] = OrderedDict()
    hooks = []
    for name, m in model.named_modules():
        if not name:
            continue

        def hook(_m, _inp, out, name=name):
            if isinstance(out, torch.Tensor):
                captured.pop(name, None)
                captured[name] = _host(out.clone())

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return captured


@dataclass
class LayerDelta:
    """One layer's activation comparison."""

    path: str
    kind: str
    shape: tuple[int, ...]
    delta: float  # max|Δ| / max(1, max|torch activation|)

    @property
    def ok(self) -> bool:
        return self.delta <= LOGIT_RTOL  # False for NaN


def _activation_delta(t: np.ndarray, f: np.ndarray) -> float:
    """``scaled_delta`` of a torch activation and its Flax twin's, inf when no layout fits.

    The Flax one is read as it is and, from 3-D up, with its channels-last axis moved to torch's
    channels-first place (NHWC -> NCHW, (N, L, C) -> (N, C, L)); of the readings with torch's
    shape the closer counts (both fit only square shapes, where the wrong one is far off).
    """
    readings = [f] + ([np.moveaxis(f, -1, 1)] if f.ndim >= 3 else [])
    deltas = [scaled_delta(t, r) for r in readings if r.shape == t.shape]
    return float(np.min(deltas)) if deltas else float("inf")  # np.min: NaN stays NaN


def layer_deltas(tmodel: torch.nn.Module, fmodel: nnx.Module, x: np.ndarray, jit: bool = False,
                 x_flax: np.ndarray | None = None) -> list[LayerDelta]:
    """Per-layer activation differences in torch execution order (both models as they are set).

    ``x`` is the torch input, ``x_flax`` the Flax one (default ``flax_input(x, tmodel)``); ``jit``
    runs the Flax model as one program (see ``NetSpec.many_small_ops``).
    """
    x_flax = flax_input(x, tmodel) if x_flax is None else x_flax
    t_acts = _capture_torch(tmodel, _on(tmodel, x))
    f_acts = _capture_flax(fmodel, jnp.asarray(x_flax), jit)
    kinds = dict((n, type(m).__name__) for n, m in tmodel.named_modules())
    return [LayerDelta(path, kinds[path], t.shape, _activation_delta(t, np.asarray(f_acts[path])))
            for path, t in t_acts.items() if isinstance(f_acts.get(path), jax.Array)]


def first_divergence(tmodel: torch.nn.Module, fmodel: nnx.Module, x: np.ndarray, jit: bool = False,
                     x_flax: np.ndarray | None = None) -> LayerDelta | None:
    """The first layer (torch execution order) whose activations exceed the tolerance, or None."""
    return next((row for row in layer_deltas(tmodel, fmodel, x, jit, x_flax) if not row.ok), None)


# --------------------------------------------------------------------------- forward, gradients
def _forward(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x)


def _ce_loss_logits(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def _grads(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[nnx.State, jax.Array]:
    """Cross-entropy gradients and the logits of the same forward."""
    return nnx.grad(_ce_loss_logits, has_aux=True)(model, x, y)


def _call(fn, jit: bool, *args):
    # Eager JAX compiles one small program per op and shape: for DenseNet (a new channel count
    # in every layer) one gradient takes 128 s eager against 40 s jitted (2-core CPU). ResNets
    # repeat shapes, so eager is cheap for them and avoids compiling 1202 layers. Which nets run
    # jitted is the registry's ``NetSpec.many_small_ops``.
    return nnx.jit(fn)(*args) if jit else fn(*args)


def flax_logits(model: nnx.Module, x: jax.Array, jit: bool = False) -> np.ndarray:
    """``model(x)`` as a numpy array, eager or, with ``jit``, as one compiled program.

    In train mode the BatchNorm updates are written back to ``model`` either way (nnx.jit does so).
    """
    return np.asarray(_call(_forward, jit, model, x))


def to_float64(model: nnx.Module) -> nnx.Module:
    """A float64 copy of a Flax model (call under ``jax.enable_x64``)."""
    model = nnx.clone(model)
    state = nnx.state(model)
    # cast on the host: an eager astype compiles one program per shape (densenet201: 7.8 s with
    # eager astype, 1.2 s on the host)
    nnx.update(model, jax.tree.map(
        lambda a: jax.device_put(np.asarray(a, np.float64)) if jnp.issubdtype(a.dtype, jnp.floating)
        else a, state))
    return model


# --------------------------------------------------------------------------- eval logits
@dataclass(frozen=True)
class EvalLogits:
    """Both frameworks' eval-mode logits on one batch, held against the parity tolerance."""

    torch_out: np.ndarray
    flax_out: np.ndarray

    @property
    def same_shape(self) -> bool:
        return self.torch_out.shape == self.flax_out.shape

    @property
    def scale(self) -> float:
        """max(1, max|torch logits|): the tolerance is relative to the logits' size."""
        return max(1.0, float(np.max(np.abs(np.asarray(self.torch_out, np.float64)))))

    @property
    def delta(self) -> float:
        """``scaled_delta`` of the logits (NaN when the shapes differ); ok when ≤ LOGIT_RTOL."""
        return scaled_delta(self.torch_out, self.flax_out) if self.same_shape else float("nan")

    @property
    def max_abs(self) -> float:
        """max|Δ| of the logits, unscaled (NaN when the shapes differ)."""
        if not self.same_shape:
            return float("nan")
        return float(np.max(np.abs(np.asarray(self.torch_out, np.float64) - self.flax_out)))

    @property
    def tolerance(self) -> float:
        """The largest max|Δ| that passes: LOGIT_RTOL·max(1, max|torch logits|)."""
        return LOGIT_RTOL * self.scale

    @property
    def ok(self) -> bool:
        return self.delta <= LOGIT_RTOL  # False for NaN


def compare_eval_logits(tmodel: torch.nn.Module, fmodel: nnx.Module, x_nchw: np.ndarray,
                        jit: bool = False, x_flax: np.ndarray | None = None) -> EvalLogits:
    """Put both models in eval mode and run them on ``x_nchw`` (the Flax model gets
    ``flax_input(x_nchw)`` unless ``x_flax`` is given; ``jit`` as in ``flax_logits``): the one
    eval-logit comparison of ``compare`` and of ``parity.files.convert_file``."""
    x_flax = flax_input(x_nchw, tmodel) if x_flax is None else x_flax
    tmodel.eval()
    fmodel.eval()
    with torch.no_grad():
        want = _host(tmodel(_on(tmodel, x_nchw)))
    return EvalLogits(want, flax_logits(fmodel, jnp.asarray(x_flax), jit))


# --------------------------------------------------------------------------- BatchNorm traps
@dataclass(frozen=True)
class _BatchSeen:
    """What a torch BatchNorm layer saw in one train-mode call: the batch's per-channel mean and
    biased variance, the values per channel, and the momentum of its update."""

    mean: np.ndarray
    var: np.ndarray
    n: int
    momentum: float


@contextlib.contextmanager
def _batches_seen(model: torch.nn.Module) -> Iterator[dict[str, _BatchSeen]]:
    """While active, each train-mode call of a torch BatchNorm layer records its ``_BatchSeen``."""
    seen: dict[str, _BatchSeen] = {}

    def hook(m: torch.nn.Module, args: tuple, name: str) -> None:
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        # momentum None: torch's cumulative average, 1 / (the counter after this call)
        m_used = m.momentum if m.momentum is not None else 1.0 / (int(m.num_batches_tracked) + 1)
        seen[name] = _BatchSeen(_host(x.mean(dims)), _host(x.var(dims, unbiased=False)),
                                x.numel() // x.shape[1], float(m_used))

    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: hook(m, args, name))
             for name, m in model.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


MOMENTUM_CONVENTION = ("Flax's momentum p means new = p·old + (1−p)·batch, torch's m new = (1−m)·old + "
                       "m·batch: torch's momentum=0.1 is nnx.BatchNorm(momentum=0.9), nnx.BatchNorm's default "
                       "0.99 is torch's 0.01, and momentum=0.1 in Flax means 0.9 in torch")


def explain_bn_stats(name: str, seen: _BatchSeen, old: dict[str, np.ndarray], new: dict[str, np.ndarray],
                     flax_momentum: float | None = None) -> list[str]:
    """Why Flax's updated running statistics of BatchNorm layer ``name`` differ from torch's.

    ``old``/``new``: Flax's ``running_mean``/``running_var`` before and after the forward (torch
    layout), ``seen``: the batch torch's layer saw, ``flax_momentum``: the Flax layer's own
    ``momentum`` in Flax's convention, if it has one. Flax's values are held against torch's
    update of that batch and against the known traps: a momentum in the other convention
    (Flax's p is torch's 1 − p), the biased batch variance in place of the unbiased.
    """
    def fits(want: np.ndarray, got: np.ndarray) -> bool:
        return scaled_delta(want, got) <= LOGIT_RTOL

    m, n = seen.momentum, seen.n
    old_mean, old_var = (np.asarray(old[s], np.float64) for s in ("running_mean", "running_var"))
    new_mean, new_var = new["running_mean"], new["running_var"]
    # the momentum (torch's sense) of Flax's update: torch's own; the Flax layer's read in Flax's
    # convention; torch's number written into Flax's convention
    tries = [m] + ([1 - flax_momentum] if flax_momentum is not None else []) + [1 - m]
    k = next((k for k in tries if fits((1 - k) * old_mean + k * seen.mean, new_mean)), None)
    if k is None:
        step = seen.mean - old_mean
        est = float(np.sum((new_mean - old_mean) * step) / max(float(np.sum(step * step)), 1e-300))
        return [f"{name}.running_mean is not torch's update of the same batch with either momentum "
                f"convention (it moved as with torch momentum ≈ {est:.3g}, torch's is {m:g}): the batch "
                f"the layer normalises may differ"]
    out = []
    if k != m:
        out.append(f"{name}.running_mean: momentum: the Flax layer moves its statistics as torch "
                   f"momentum={k:.3g} does, torch's layer has momentum={m:g}; {MOMENTUM_CONVENTION}. "
                   f"Here: nnx.BatchNorm(momentum={1 - m:g})")
    unbiased = seen.var * (n / max(n - 1, 1))
    if not fits((1 - k) * old_var + k * unbiased, new_var):
        if fits((1 - k) * old_var + k * seen.var, new_var):
            out.append(f"{name}.running_var differs by the n/(n-1) factor (n = {n} values per channel): "
                       f"nnx.BatchNorm updates with the biased batch variance, torch with the unbiased "
                       f"(flaxnets.layers.BatchNorm2d has torch's semantics)")
        else:
            out.append(f"{name}.running_var is neither torch's update (the unbiased batch variance) nor the "
                       f"same with the biased variance")
    return out


def _eps_mismatches(tmodel: torch.nn.Module, fmodel: nnx.Module) -> tuple[int, list[str]]:
    """How many norm layers both sides have at one path, and a line for each whose eps differs
    (nnx.LayerNorm and nnx.GroupNorm default to epsilon=1e-6, torch's norms to 1e-5)."""
    t_mods, pairs, out = dict(tmodel.named_modules()), 0, []
    for path, fm in module_paths(fmodel):
        t_eps = getattr(t_mods.get(path), "eps", None)
        f_eps = getattr(fm, "epsilon", getattr(fm, "eps", None))
        if not (isinstance(t_eps, float) and isinstance(f_eps, float)):
            continue
        pairs += 1
        if t_eps != f_eps:
            out.append(f"{path}: eps differs: torch {type(t_mods[path]).__name__}(eps={t_eps:g}), Flax "
                       f"{type(fm).__name__}(epsilon={f_eps:g}); nnx.LayerNorm and nnx.GroupNorm default to "
                       f"1e-6, torch to 1e-5")
    return pairs, out


def _fast_variance_layers(fmodel: nnx.Module) -> list[str]:
    """Flax layers that compute the variance as E[x²]−E[x]² (``use_fast_variance``, Flax's default)."""
    return [f"{path}: {type(m).__name__}(use_fast_variance=True) computes the variance as E[x²]−E[x]², "
            f"which loses digits in float32; use_fast_variance=False is the two-pass variance torch uses"
            for path, m in module_paths(fmodel) if getattr(m, "use_fast_variance", False) is True]


# --------------------------------------------------------------------------- the comparison
def _num(v: float) -> str:
    return "—" if v != v else f"{v:.1e}"  # NaN -> not measured


@dataclass
class CompareReport:
    """What ``compare`` measured; ``str(report)`` is a table, one row per checked quantity."""

    eval_logits: EvalLogits
    title: str = ""  # which pair, on which input
    train_logits_delta: float = float("nan")  # float64 on both sides: the conversion
    train_f32_error: float = float("nan")  # Flax float32 vs the float64 logits
    torch_f32_error: float = float("nan")  # torch float32 vs the float64 logits
    train_logits64: np.ndarray | None = None  # torch's float64 train-mode logits, the reference
    bn_stats: dict[str, float] | None = None  # torch key -> scaled_delta, float32; None: not measured
    grads: dict[str, float] = field(default_factory=dict)  # torch parameter -> grad_rel_delta, float64
    norm_layers: int = 0  # norm layers whose eps was compared
    eps_mismatches: list[str] = field(default_factory=list)
    first_divergence: LayerDelta | None = None
    divergence_mode: str = ""  # "eval" or "train, float64": the forward that was searched
    traps: list[str] = field(default_factory=list)  # known causes named for a failure
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def logits_delta(self) -> float:
        """The eval logits' ``scaled_delta`` (NaN when the shapes differ)."""
        return self.eval_logits.delta

    @property
    def bn_stats_delta(self) -> float:
        """The largest running-statistic ``scaled_delta`` (0 without BatchNorm, NaN not measured)."""
        return float("nan") if self.bn_stats is None else max(self.bn_stats.values(), default=0.0)

    @property
    def worst_bn_stat(self) -> str:
        return max(self.bn_stats or {}, key=(self.bn_stats or {}).__getitem__, default="")

    @property
    def grads_delta(self) -> float:
        return max(self.grads.values(), default=float("nan"))

    @property
    def worst_grad(self) -> str:
        return max(self.grads, key=self.grads.__getitem__, default="")

    @property
    def measured_train(self) -> bool:
        return self.train_logits_delta == self.train_logits_delta  # not NaN

    @property
    def f32_bound(self) -> float:
        """How far Flax's float32 train logits may be from the float64 ones."""
        return max(LOGIT_RTOL, F32_ERROR_RATIO * self.torch_f32_error)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(quantity, measured, tolerance, worst tensor, verdict) for each checked quantity."""
        def verdict(ok: bool, measured: bool = True) -> str:
            return "—" if not measured else "PASS" if ok else "FAIL"

        ev, train = self.eval_logits, self.measured_train
        shape = f"logits {tuple(ev.flax_out.shape)}" + ("" if ev.same_shape else
                                                         f", torch {tuple(ev.torch_out.shape)}")
        return [
            ("eval logits", _num(ev.delta), f"{LOGIT_RTOL:.1e}", shape, verdict(ev.ok)),
            ("train logits (float64)", _num(self.train_logits_delta), f"{LOGIT_RTOL:.1e}", "logits",
             verdict(self.train_logits_delta <= LOGIT_RTOL, train)),
            ("train logits float32 error, flax / torch",
             f"{_num(self.train_f32_error)} / {_num(self.torch_f32_error)}",
             f"{_num(self.f32_bound)} ({F32_ERROR_RATIO:g}× torch's)" if train else "—", "logits",
             verdict(self.train_f32_error <= self.f32_bound, train)),
            ("BN running statistics", _num(self.bn_stats_delta), f"{LOGIT_RTOL:.1e}",
             self.worst_bn_stat or ("no BatchNorm" if self.bn_stats is not None else ""),
             verdict(self.bn_stats_delta <= LOGIT_RTOL, self.bn_stats is not None)),
            ("gradients (float64), max|Δg|/max|g|", _num(self.grads_delta), f"{GRAD_RTOL:.1e}",
             self.worst_grad, verdict(self.grads_delta <= GRAD_RTOL, train)),
            ("norm layers' eps, torch vs Flax", f"{len(self.eps_mismatches)} of {self.norm_layers} differ",
             "equal", self.eps_mismatches[0].split(":")[0] if self.eps_mismatches else "",
             verdict(not self.eps_mismatches)),
        ]

    def __str__(self) -> str:
        head = ("checked", "max Δ", "tolerance", "worst", "verdict")
        rows = [head, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [self.title] if self.title else []
        for r in rows:  # text columns left-aligned, numbers right-aligned
            cells = (c.ljust(w) if i in (0, 3, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            lines.append("  ".join(cells).rstrip())
        d = self.first_divergence
        if d is not None:
            lines.append(f"first divergent layer ({self.divergence_mode}): {d.path} ({d.kind}, output "
                         f"{tuple(d.shape)}): Δ {d.delta:.2e} > {LOGIT_RTOL:.0e}")
        lines += [textwrap.fill(f"failed: {f}", 100, subsequent_indent="    ") for f in self.failures]
        lines += [textwrap.fill(f"why: {t}", 100, subsequent_indent="    ") for t in self.traps]
        lines.append("PASS" if self.ok else f"FAIL ({len(self.failures)} check(s))")
        return "\n".join(lines)


def compare(torch_model: torch.nn.Module, flax_model: nnx.Module, x: Any, y: Any = None, *,
            jit: bool = False, x_flax: Any = None, device: str | torch.device | None = None) -> CompareReport:
    """Hold a torch module and its Flax NNX twin against the parity tolerances on batch ``x``.

    ``x`` is the torch input (numpy or a torch tensor; floats run in float32 and, for the train
    logits and gradients, float64); the Flax model gets ``flax_input(x)`` (NCHW images as NHWC,
    a Conv1d's (N, C, L) as (N, L, C), (N, L, C) sequences and other ranks as they are) unless
    ``x_flax`` is given. Both must return (N, classes) logits (else ValueError) and hold the same
    tensors (else StateDictMismatchError). ``y``: labels of the cross-entropy whose gradients are
    compared, by default ``np.random.RandomState(LABEL_SEED).randint(classes, size=N)``. ``jit``
    runs the Flax forwards and gradient as compiled programs (nets with many layer shapes, e.g.
    DenseNets). ``device``: where the torch side runs (the copy is moved there; default: where
    ``torch_model`` is); the Flax side runs on JAX's default device. The models are not changed:
    the checks run on copies. A difference never raises; it is a line of ``failures``, and the
    table says which check failed.
    """
    x = _float32(np.ascontiguousarray(to_numpy(x)))
    tmodel, fmodel = copy.deepcopy(torch_model), nnx.clone(flax_model)
    if device is not None:
        tmodel.to(device)
    xf = _float32(flax_input(x, tmodel) if x_flax is None else np.ascontiguousarray(to_numpy(x_flax)))
    check_state_dict({k: v.shape for k, v in to_numpy_state_dict(fmodel).items()}, tmodel.state_dict(),
                     what=f"Flax {type(flax_model).__name__}")

    title = (f"{type(torch_model).__name__} (torch) vs {type(flax_model).__name__} (Flax), input "
             f"{tuple(x.shape)} {x.dtype}, Flax input {tuple(xf.shape)}{', jitted' if jit else ''}"
             + ("" if torch_device(tmodel).type == "cpu" else f", torch on {torch_device(tmodel)}"))
    rep = CompareReport(compare_eval_logits(tmodel, fmodel, x, jit, xf), title)
    lt, lf = rep.eval_logits.torch_out, rep.eval_logits.flax_out
    if lt.ndim != 2:
        raise ValueError(f"compare needs (N, classes) logits; the torch model returned shape "
                         f"{tuple(lt.shape)}")
    rep.norm_layers, rep.eps_mismatches = _eps_mismatches(tmodel, fmodel)
    rep.failures += [f"norm eps: {e}" for e in rep.eps_mismatches]
    if not rep.eval_logits.ok:
        rep.failures.append(f"output shape flax {lf.shape} torch {lt.shape}" if not rep.eval_logits.same_shape
                            else f"eval logits Δ {rep.logits_delta:.2e} > {LOGIT_RTOL:.0e}")
        rep.first_divergence, rep.divergence_mode = first_divergence(tmodel, fmodel, x, jit, xf), "eval"
        if not rep.eval_logits.same_shape:
            return rep
    if y is None:
        y = np.random.RandomState(LABEL_SEED).randint(0, lt.shape[1], size=lt.shape[0])

    # train mode: one forward, dropout off on both sides (their random streams cannot agree)
    tmodel.train()
    fmodel.train()
    _dropout_off(tmodel, fmodel)
    t64, f_pre = copy.deepcopy(tmodel).double(), nnx.clone(fmodel)  # states before the forward
    out_t, out_f = _check_train_forward(rep, tmodel, fmodel, x, xf, jit)
    _check_float64(rep, t64, f_pre, x, xf, np.asarray(to_numpy(y), np.int64), jit)
    ref = rep.train_logits64
    rep.torch_f32_error, rep.train_f32_error = scaled_delta(ref, out_t), scaled_delta(ref, out_f)
    if not rep.train_f32_error <= rep.f32_bound:
        rep.failures.append(f"train logits in float32 are {rep.train_f32_error:.2e} off the float64 ones, "
                            f"> {rep.f32_bound:.2e} (torch's float32 error {rep.torch_f32_error:.2e} × "
                            f"{F32_ERROR_RATIO:g}, at least {LOGIT_RTOL:.0e})")
        if rep.train_logits_delta <= LOGIT_RTOL:  # a float32-only error: how the variance is computed
            rep.traps += _fast_variance_layers(fmodel)
    return rep


def _check_train_forward(rep: CompareReport, tmodel: torch.nn.Module, fmodel: nnx.Module,
                         x: np.ndarray, xf: np.ndarray, jit: bool) -> tuple[np.ndarray, np.ndarray]:
    """One float32 train-mode forward of both models: their updated BatchNorm statistics into
    ``rep`` (with the traps behind a difference); the logits, returned."""
    f_old = to_numpy_state_dict(fmodel)
    with _batches_seen(tmodel) as seen, torch.no_grad():
        out_t = _host(tmodel(_on(tmodel, x)))
    out_f = flax_logits(fmodel, jnp.asarray(xf), jit)  # the BN updates are written back to fmodel
    f_sd = to_numpy_state_dict(fmodel)
    t_sd = {k: _host(v) for k, v in tmodel.state_dict().items()}
    untracked = set(torch_only_keys(fmodel))  # nnx.BatchNorm's counter: written as 0, not compared
    rep.bn_stats = {k: scaled_delta(t_sd[k], f_sd[k]) for k in t_sd
                    if k.endswith(BN_STAT_KEYS) and k not in untracked}
    if not rep.bn_stats_delta <= LOGIT_RTOL:  # NaN fails too
        rep.failures.append(f"BN running stats Δ {rep.bn_stats_delta:.2e} > {LOGIT_RTOL:.0e} "
                            f"({rep.worst_bn_stat})")
        f_layers = dict(module_paths(fmodel))
        for name, batch in seen.items():
            keys = {s: f"{name}.{s}" for s in ("running_mean", "running_var")}
            if all(rep.bn_stats.get(k, 0.0) <= LOGIT_RTOL for k in keys.values()):
                continue
            layer = f_layers.get(name)
            rep.traps += explain_bn_stats(name, batch, {s: f_old[k] for s, k in keys.items()},
                                          {s: f_sd[k] for s, k in keys.items()},
                                          layer.momentum if isinstance(layer, nnx.BatchNorm) else None)
    return out_t, out_f


def _check_float64(rep: CompareReport, t64: torch.nn.Module, f_pre: nnx.Module, x: np.ndarray,
                   xf: np.ndarray, y: np.ndarray, jit: bool) -> None:
    """The train-mode logits and every parameter's gradient, float64 on both sides, into ``rep``
    (``t64``: torch's model in float64 and train mode, ``f_pre``: Flax's in train mode)."""
    # In float32, DenseNet's train-mode gradients are ill-conditioned: torch's own float32
    # gradients differ from its float64 ones by up to 23 % (densenet121_se, batch 2, 64×64), so a
    # float32 comparison would test rounding, not the conversion. In float64 a real difference
    # still shows; rounding does not. The train-mode logits of that same float64 forward prove
    # the conversion; the float32 ones are held against them for accuracy (F32_ERROR_RATIO).
    x64, xf64 = _float64(x), _float64(xf)
    t64.zero_grad()
    out_t64 = t64(_on(t64, x64))
    torch.nn.functional.cross_entropy(out_t64, _on(t64, y)).backward()
    rep.train_logits64 = _host(out_t64)
    with jax.enable_x64(True):
        f64 = to_float64(f_pre)
        grads, out_f64 = _call(_grads, jit, f64, jnp.asarray(xf64), jnp.asarray(y))
        nnx.update(f64, grads)  # the converter brings the gradients to torch layout
        g_f = to_numpy_state_dict(f64)
        rep.train_logits_delta = scaled_delta(rep.train_logits64, np.asarray(out_f64))
        if not rep.train_logits_delta <= LOGIT_RTOL:  # NaN fails too
            rep.failures.append(f"train logits Δ (f64) {rep.train_logits_delta:.2e} > {LOGIT_RTOL:.0e}")
            if rep.first_divergence is None:  # eval mode agreed: search the float64 train forward
                rep.first_divergence = first_divergence(t64, to_float64(f_pre), x64, jit, xf64)
                rep.divergence_mode = "train, float64"
    g_t = {n: _host(p.grad) for n, p in t64.named_parameters() if p.grad is not None}
    floor = 1e-6 * max((float(np.max(np.abs(g))) for g in g_t.values() if g.size), default=0.0)
    rep.grads = {n: grad_rel_delta(g, g_f[n], floor) for n, g in g_t.items()}
    if not rep.grads_delta <= GRAD_RTOL:  # NaN fails too
        rep.failures.append(f"gradient of {rep.worst_grad} rel Δ {rep.grads_delta:.2e} > {GRAD_RTOL:.0e}")
