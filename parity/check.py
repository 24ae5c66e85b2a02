"""Prove a Flax net and its torch twin compute the same function, and say where they do not.

``check_net`` draws random torch weights (BatchNorm statistics included, so eval mode is not
an identity), converts them and compares: parameter count, output shape, eval logits,
train-mode logits + updated BN statistics after one forward, cross-entropy gradients of every
parameter, and the torch -> flax -> torch round trip. When eval logits differ,
``first_divergence`` names the first layer whose activations differ.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import flaxnets
import torch_ref
from flaxnets.introspect import count_params, record_outputs
from parity.convert import flax_to_torch, to_numpy_state_dict, torch_to_flax

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


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


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
    """Every submodule's output by module path, from one call of ``model`` (eager, or jitted:
    DenseNet-121-SE at 64x64: 29 s eager, 8 s jitted on the 2-core CPU)."""
    classes = {type(m) for p, m in nnx.iter_modules(model) if p}

    def run(model: nnx.Module, x: jax.Array) -> dict[str, Any]:
        paths = {id(m): ".".join(map(str, p)) for p, m in nnx.iter_modules(model) if p}
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
                captured[name] = out.detach().clone().numpy()

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


def layer_deltas(tmodel: torch.nn.Module, fmodel: nnx.Module, x_nchw: np.ndarray,
                 jit: bool = False) -> list[LayerDelta]:
    """Per-layer activation differences in torch execution order (both models as they are set);
    ``jit`` runs the Flax model as one program (see ``NetSpec.many_small_ops``)."""
    t_acts = _capture_torch(tmodel, torch.from_numpy(x_nchw))
    f_acts = _capture_flax(fmodel, jnp.asarray(nchw_to_nhwc(x_nchw)), jit)
    kinds = dict((n, type(m).__name__) for n, m in tmodel.named_modules())
    rows = []
    for path, t in t_acts.items():
        f = f_acts.get(path)
        if not isinstance(f, jax.Array):
            continue
        f = np.asarray(f)
        if f.ndim == 4:
            f = np.transpose(f, (0, 3, 1, 2))
        if f.shape != t.shape:
            rows.append(LayerDelta(path, kinds[path], t.shape, float("inf")))
            continue
        rows.append(LayerDelta(path, kinds[path], t.shape, scaled_delta(t, f)))
    return rows


def first_divergence(tmodel: torch.nn.Module, fmodel: nnx.Module, x_nchw: np.ndarray,
                     jit: bool = False) -> LayerDelta | None:
    """The first layer (torch execution order) whose activations exceed the tolerance, or None."""
    return next((row for row in layer_deltas(tmodel, fmodel, x_nchw, jit) if not row.ok), None)


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

    @property
    def ok(self) -> bool:
        return not self.failures


def _ce_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


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
    """``model(x)`` (NHWC input) as a numpy array, eager or, with ``jit``, as one compiled program.

    In train mode the BatchNorm updates are written back to ``model`` either way (nnx.jit does so).
    """
    return np.asarray(_call(_forward, jit, model, x))


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
                        jit: bool = False) -> EvalLogits:
    """Put both models in eval mode and run them on ``x_nchw`` (the Flax model gets it as NHWC;
    ``jit`` as in ``flax_logits``): the one eval-logit comparison of the parity checks and of
    ``parity.files.convert_file``."""
    tmodel.eval()
    fmodel.eval()
    with torch.no_grad():
        want = tmodel(torch.from_numpy(x_nchw)).numpy()
    return EvalLogits(want, flax_logits(fmodel, jnp.asarray(nchw_to_nhwc(x_nchw)), jit))


def _to_float64(model: nnx.Module) -> nnx.Module:
    """A float64 copy of a Flax model (call under ``jax.enable_x64``)."""
    model = nnx.clone(model)
    state = nnx.state(model)
    # cast on the host: an eager astype compiles one program per shape (densenet201: 7.8 s with
    # eager astype, 1.2 s on the host)
    nnx.update(model, jax.tree.map(
        lambda a: jax.device_put(np.asarray(a, np.float64)) if jnp.issubdtype(a.dtype, jnp.floating)
        else a, state))
    return model


def check_net(name: str, seed: int = 0, batch: int = 2, input_shape: tuple[int, int, int] | None = None,
              jit: bool | None = None, **kw) -> ParityResult:
    """Run every parity check on net ``name`` with random weights; never raises on a mismatch,
    it records it in ``failures``. ``jit`` defaults to the registry's ``many_small_ops``."""
    spec = flaxnets.get_spec(name)
    h, w, c = input_shape or spec.check_shape
    jit = spec.many_small_ops if jit is None else jit
    res = ParityResult(name, spec.params)
    torch.manual_seed(seed)
    tmodel = torch_ref.create(name, **kw)
    randomize_torch(tmodel, seed, (h, w, c))
    # cloned: torch's train-mode forward below updates the BN statistics in place
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
    x_t, x_f = torch.from_numpy(x), jnp.asarray(nchw_to_nhwc(x))

    # eval mode
    logits = compare_eval_logits(tmodel, fmodel, x, jit)
    lf, lt = logits.flax_out, logits.torch_out
    res.output_shape, res.expected_shape = lf.shape, (batch, spec.num_classes)
    if lf.shape != lt.shape or lf.shape != res.expected_shape:
        res.failures.append(f"output shape flax {lf.shape} torch {lt.shape} expected {res.expected_shape}")
    else:
        res.logits_delta = logits.delta
        if not logits.ok:
            res.failures.append(f"eval logits Δ {res.logits_delta:.2e} > {LOGIT_RTOL:.0e}")
            res.divergence = first_divergence(tmodel, fmodel, x, jit)

    # train mode: one forward, dropout off on both sides (their random streams cannot agree)
    tmodel.train()
    fmodel.train()
    _dropout_off(tmodel, fmodel)
    t64, f_pre = copy.deepcopy(tmodel).double(), nnx.clone(fmodel)  # states before the forward
    with torch.no_grad():
        out_t = tmodel(x_t).numpy()
    out_f = flax_logits(fmodel, x_f, jit)  # the BN updates are written back to fmodel
    f_sd = to_numpy_state_dict(fmodel)
    t_sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    stat_keys = [k for k in t_sd if k.endswith(BN_STAT_KEYS)]
    res.bn_stats_delta = max((scaled_delta(t_sd[k], f_sd[k]) for k in stat_keys), default=0.0)
    if not res.bn_stats_delta <= LOGIT_RTOL:  # NaN fails too
        res.failures.append(f"BN running stats Δ {res.bn_stats_delta:.2e} > {LOGIT_RTOL:.0e}")

    # Gradients in float64 on both sides. In float32, DenseNet's train-mode gradients are
    # ill-conditioned: torch's own float32 gradients differ from its float64 ones by up to 23 %
    # (densenet121_se, batch 2, 64×64), so a float32 comparison would test rounding, not the
    # conversion. In float64 a real difference still shows; rounding does not.
    # The train-mode logits of that same float64 forward prove the conversion; the float32 ones
    # are held against them for accuracy (F32_ERROR_RATIO).
    t64.zero_grad()
    out_t64 = t64(x_t.double())
    torch.nn.functional.cross_entropy(out_t64, torch.from_numpy(y)).backward()
    out_t64 = out_t64.detach().numpy()
    with jax.enable_x64(True):
        f64 = _to_float64(f_pre)
        grads, out_f64 = _call(_grads, jit, f64, jnp.asarray(x_f, jnp.float64), jnp.asarray(y))
        out_f64 = np.asarray(out_f64)
        nnx.update(f64, grads)  # the converter brings the gradients to torch layout
        g_f = to_numpy_state_dict(f64)
    res.train_logits_delta = scaled_delta(out_t64, out_f64)
    if not res.train_logits_delta <= LOGIT_RTOL:  # NaN fails too
        res.failures.append(f"train logits Δ (f64) {res.train_logits_delta:.2e} > {LOGIT_RTOL:.0e}")
    res.torch_f32_error, res.train_f32_error = scaled_delta(out_t64, out_t), scaled_delta(out_t64, out_f)
    f32_bound = max(LOGIT_RTOL, F32_ERROR_RATIO * res.torch_f32_error)
    if not res.train_f32_error <= f32_bound:
        res.failures.append(f"train logits in float32 are {res.train_f32_error:.2e} off the float64 ones, "
                            f"> {f32_bound:.2e} (torch's float32 error {res.torch_f32_error:.2e} × "
                            f"{F32_ERROR_RATIO:g}, at least {LOGIT_RTOL:.0e})")
    g_t = {n: p.grad.numpy() for n, p in t64.named_parameters()}
    floor = 1e-6 * max(float(np.max(np.abs(g))) for g in g_t.values())
    rel = {n: grad_rel_delta(g, g_f[n], floor) for n, g in g_t.items()}
    res.worst_grad, res.grads_delta = max(rel.items(), key=lambda kv: kv[1])
    if not res.grads_delta <= GRAD_RTOL:  # NaN fails too
        res.failures.append(f"gradient of {res.worst_grad} rel Δ {res.grads_delta:.2e} > {GRAD_RTOL:.0e}")

    # torch -> flax -> torch round trip, bit for bit (f_pre: the conversion before any forward
    # in train mode; converting again cost resnet1202 19 s)
    back = flax_to_torch(f_pre)
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
