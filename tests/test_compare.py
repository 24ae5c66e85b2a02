"""Parity as a library: stock torch/Flax layers convert both ways, strictly; compare proves a pair
equal, names the layer that is not, and names the BatchNorm and eps traps; docs/porting.md runs."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import parity
from flaxnets.layers import BatchNorm2d
from parity import StateDictMismatchError, UnsupportedLayerError, flax_to_torch, torch_to_flax
from parity.check import randomize_torch
from parity.comparison import flax_input, layer_deltas
from parity.examples import FlaxNet, TorchNet

ROOT = Path(__file__).resolve().parents[1]
R = nnx.Rngs(0)

# stock layer -> (torch layer, its nnx twin, torch input shape or ("int", N, L) token ids)
STOCK = {
    "conv1d": (lambda: torch.nn.Conv1d(3, 5, 3, padding=1),
               lambda: nnx.Conv(3, 5, (3,), padding=((1, 1),), rngs=R), (2, 3, 7)),
    "conv1d_no_bias": (lambda: torch.nn.Conv1d(3, 5, 2, stride=2, bias=False),
                       lambda: nnx.Conv(3, 5, (2,), strides=(2,), padding="VALID", use_bias=False, rngs=R),
                       (2, 3, 8)),
    "conv2d": (lambda: torch.nn.Conv2d(3, 5, (3, 2)),
               lambda: nnx.Conv(3, 5, (3, 2), padding="VALID", rngs=R), (2, 3, 6, 7)),
    "linear": (lambda: torch.nn.Linear(4, 6), lambda: nnx.Linear(4, 6, rngs=R), (2, 4)),
    "batchnorm1d": (lambda: torch.nn.BatchNorm1d(4), lambda: nnx.BatchNorm(4, rngs=R), (3, 4)),
    "batchnorm2d": (lambda: torch.nn.BatchNorm2d(4), lambda: nnx.BatchNorm(4, rngs=R), (2, 4, 3, 3)),
    "layernorm": (lambda: torch.nn.LayerNorm(6), lambda: nnx.LayerNorm(6, epsilon=1e-5, rngs=R), (2, 5, 6)),
    "layernorm_no_bias": (lambda: torch.nn.LayerNorm(6, bias=False),
                          lambda: nnx.LayerNorm(6, use_bias=False, epsilon=1e-5, rngs=R), (2, 5, 6)),
    "layernorm_no_affine": (lambda: torch.nn.LayerNorm(6, elementwise_affine=False),
                            lambda: nnx.LayerNorm(6, use_scale=False, use_bias=False, epsilon=1e-5, rngs=R),
                            (2, 5, 6)),
    "groupnorm": (lambda: torch.nn.GroupNorm(2, 4), lambda: nnx.GroupNorm(4, num_groups=2, epsilon=1e-5, rngs=R),
                  (2, 4, 3, 3)),
    "embedding": (lambda: torch.nn.Embedding(10, 4), lambda: nnx.Embed(10, 4, rngs=R), ("int", 2, 5)),
}


def _stock_pair(kind: str, seed: int = 0) -> tuple[torch.nn.Module, nnx.Module, np.ndarray]:
    """torch Sequential(Identity, layer) with random tensors, nnx.Sequential(identity, twin), an input.

    The identity makes the layer child 1: torch key ``1.weight``, Flax path ``layers.1``.
    """
    make_t, make_f, shape = STOCK[kind]
    torch.manual_seed(seed)
    tmodel = torch.nn.Sequential(torch.nn.Identity(), make_t())
    with torch.no_grad():
        for name, t in tmodel.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand_like(t))
            else:
                t.copy_(torch.randn_like(t))
    fmodel = nnx.Sequential(lambda x: x, make_f())
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 10, size=shape[1:]) if shape[0] == "int" else rng.randn(*shape).astype(np.float32)
    return tmodel, fmodel, x


@pytest.mark.parametrize("kind", list(STOCK))
def test_a_stock_layer_converts_both_ways_and_computes_torchs_output(kind):
    tmodel, fmodel, x = _stock_pair(kind)
    sd = {k: v.clone() for k, v in tmodel.state_dict().items()}
    assert torch_to_flax(fmodel, sd) is fmodel  # loaded in place

    # the same function: the layer's output (eval mode) in torch's layout
    tmodel.eval()
    fmodel.eval()
    rows = layer_deltas(tmodel, fmodel, x)
    assert [r.path for r in rows] == ["1"] and rows[0].ok, rows  # "0": a function on the Flax side
    # and that check can fail: a wrong layout would not pass it
    if kind.startswith("conv"):
        k = fmodel.layers[1].kernel
        k.set_value(jnp.flip(k[...], axis=0))
        assert not layer_deltas(tmodel, fmodel, x)[0].ok
        torch_to_flax(fmodel, sd)

    # torch -> flax -> torch: the same keys, order and values; nnx.BatchNorm's counter comes back as 0
    back = flax_to_torch(fmodel)
    assert list(back) == list(sd)
    for key, want in sd.items():
        if isinstance(fmodel.layers[1], nnx.BatchNorm) and key.endswith("num_batches_tracked"):
            want = torch.zeros((), dtype=torch.int64)
        assert back[key].dtype == want.dtype and torch.equal(back[key], want), key
    fresh = torch.nn.Sequential(torch.nn.Identity(), STOCK[kind][0]())
    fresh.load_state_dict(back, strict=True)

    # flax -> torch -> flax, from other random Flax values
    other, rng = _stock_pair(kind, seed=1)[1], np.random.RandomState(2)
    nnx.update(other, jax.tree.map(lambda a: jnp.asarray(rng.randn(*a.shape).astype(np.float32)),
                                   nnx.state(other)))
    fresh.load_state_dict(flax_to_torch(other), strict=True)
    again = torch_to_flax(_stock_pair(kind, seed=3)[1], fresh.state_dict())
    flat = [nnx.to_flat_state(nnx.state(m)) for m in (other, again)]
    for (p1, a), (p2, b) in zip(*flat, strict=True):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))


@pytest.mark.parametrize("kind", list(STOCK))
def test_a_stock_layers_missing_extra_and_misshaped_keys_are_one_error_and_load_nothing(kind):
    tmodel, fmodel, _ = _stock_pair(kind)
    before = {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(fmodel))}
    sd = dict(tmodel.state_dict())
    keys = list(sd)  # a layer has 0 (LayerNorm without affine) to 5 keys
    shaped, missing = keys[:1], keys[1:][-1:]
    for k in shaped:
        sd[k] = torch.zeros(*sd[k].shape, 2)
    for k in missing:
        del sd[k]
    sd["1.extra"] = torch.zeros(3)
    with pytest.raises(StateDictMismatchError) as info:
        torch_to_flax(fmodel, sd)
    assert info.value.missing == missing and info.value.unexpected == ["1.extra"]
    assert [k for k, _, _ in info.value.mismatched] == shaped
    assert "unexpected: 1.extra" in str(info.value)
    assert all(f"missing:    {k}" in str(info.value) for k in missing)
    for p, v in nnx.to_flat_state(nnx.state(fmodel)):
        np.testing.assert_array_equal(np.asarray(v[...]), before[p])


def test_stock_batchnorm_needs_the_counter_key_and_exports_it_as_0():
    tmodel, fmodel, _ = _stock_pair("batchnorm2d")
    sd = dict(tmodel.state_dict())
    assert int(sd["1.num_batches_tracked"]) == 7
    torch_to_flax(fmodel, sd)
    assert not hasattr(fmodel.layers[1], "num_batches_tracked")
    assert parity.convert.torch_only_keys(fmodel) == ["1.num_batches_tracked"]
    counter = flax_to_torch(fmodel)["1.num_batches_tracked"]
    assert counter.shape == () and counter.dtype == torch.int64 and int(counter) == 0
    del sd["1.num_batches_tracked"]
    with pytest.raises(StateDictMismatchError, match=r"missing:    1\.num_batches_tracked"):
        torch_to_flax(fmodel, sd)


def test_a_layer_without_a_rule_is_refused_both_ways():
    class Scale(nnx.Module):
        def __init__(self):
            self.alpha = nnx.Param(jnp.ones(3))

        def __call__(self, x):
            return x * self.alpha[...]

    model = nnx.Sequential(nnx.Linear(3, 3, rngs=R), Scale())
    with pytest.raises(UnsupportedLayerError, match=r"1\.alpha \(.*Scale\)"):
        flax_to_torch(model)
    with pytest.raises(UnsupportedLayerError) as info:
        torch_to_flax(model, {"0.weight": torch.zeros(3, 3), "0.bias": torch.zeros(3)})
    assert len(info.value.variables) == 1 and "module types with a rule" in str(info.value)


def test_torch_to_flax_takes_a_model_only_without_registry_arguments():
    tmodel, fmodel, _ = _stock_pair("linear")
    with pytest.raises(TypeError, match="apply to a registry name"):
        torch_to_flax(fmodel, tmodel.state_dict(), num_classes=3)
    with pytest.raises(TypeError, match=r"got a torch module \(Sequential\).*torch_to_flax\(model, w\)$"):
        torch_to_flax(fmodel, tmodel)


def test_the_flax_input_is_channels_last_where_torch_reads_channels_first():
    x4 = np.zeros((2, 3, 5, 7), np.float32)
    assert flax_input(x4, torch.nn.Conv2d(3, 1, 1)).shape == (2, 5, 7, 3)
    x3 = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    np.testing.assert_array_equal(flax_input(x3, torch.nn.Sequential(torch.nn.Conv1d(3, 4, 1))),
                                  np.transpose(x3, (0, 2, 1)))
    assert flax_input(x3, torch.nn.Sequential(torch.nn.Linear(5, 2))) is x3  # (N, L, C) into Linear
    ids = np.zeros((2, 5), np.int64)
    assert flax_input(ids, torch.nn.Embedding(3, 4)) is ids


# --------------------------------------------------------------------------- compare
def _example(seed: int = 0) -> tuple[TorchNet, FlaxNet, np.ndarray]:
    torch.manual_seed(seed)
    tnet = TorchNet()
    randomize_torch(tnet, seed, (16, 16, 3))
    fnet = torch_to_flax(FlaxNet(rngs=nnx.Rngs(0)), tnet.state_dict())
    return tnet, fnet, np.random.RandomState(seed).randn(4, 3, 16, 16).astype(np.float32)


def _row(report: parity.CompareReport, name: str) -> tuple[str, ...]:
    return next(r for r in report.rows() if r[0].startswith(name))


def test_compare_passes_a_matching_pair_and_changes_neither_model():
    tnet, fnet, x = _example()
    t_before = {k: v.clone() for k, v in tnet.state_dict().items()}
    f_before = {k: v.copy() for k, v in parity.to_numpy_state_dict(fnet).items()}
    report = parity.compare(tnet, fnet, torch.from_numpy(x))  # a torch tensor is taken too
    assert report.ok, str(report)
    assert report.first_divergence is None and report.traps == []
    assert set(report.grads) == {n for n, _ in tnet.named_parameters()}
    assert set(report.bn_stats) == {"features.1.running_mean", "features.1.running_var",
                                    "features.1.num_batches_tracked"}
    assert report.train_logits_delta < 1e-12 and report.grads_delta < 1e-9  # float64: rounding is gone
    text = str(report)
    assert text.endswith("\nPASS") and [r[-1] for r in report.rows()] == ["PASS"] * 6
    assert "BN running statistics" in text and "gradients (float64)" in text
    assert tnet.training and all(torch.equal(v, t_before[k]) for k, v in tnet.state_dict().items())
    assert all(np.array_equal(v, f_before[k]) for k, v in parity.to_numpy_state_dict(fnet).items())


class TorchText(torch.nn.Module):
    """Token ids -> Embedding -> Conv1d over the sequence -> mean -> LayerNorm -> Linear."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv1d(8, 12, 3, padding=1)
        self.norm = torch.nn.LayerNorm(12)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, ids):
        h = torch.relu(self.conv(self.embed(ids).transpose(1, 2)))  # (N, 12, L)
        return self.head(self.norm(h.mean(dim=2)))


class FlaxText(nnx.Module):
    def __init__(self, *, rngs):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 12, (3,), padding=((1, 1),), rngs=rngs)
        self.norm = nnx.LayerNorm(12, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, ids):
        h = nnx.relu(self.conv(self.embed(ids)))  # (N, L, 12)
        return self.head(self.norm(jnp.mean(h, axis=1)))


class TorchSignal(torch.nn.Module):
    """(N, C, L) signals -> Conv1d -> BatchNorm1d -> ReLU -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 6, 3)
        self.bn = torch.nn.BatchNorm1d(6)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=2))


class FlaxSignal(nnx.Module):
    def __init__(self, *, rngs):
        self.conv = nnx.Conv(3, 6, (3,), padding="VALID", rngs=rngs)
        self.bn = BatchNorm2d(6)  # channels last, any rank: torch's BatchNorm semantics
        self.fc = nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x):  # (N, L, C)
        return self.fc(jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=1))


def test_compare_passes_a_token_id_pair():
    torch.manual_seed(0)
    ttext = TorchText()
    report = parity.compare(ttext, torch_to_flax(FlaxText(rngs=nnx.Rngs(0)), ttext.state_dict()),
                            np.random.RandomState(0).randint(0, 20, size=(4, 9)))
    assert report.ok, str(report)
    assert report.norm_layers == 1 and "Flax input (4, 9)" in report.title


def test_compare_passes_a_signal_pair_given_channels_first():
    torch.manual_seed(0)
    tsig = TorchSignal()
    with torch.no_grad():
        tsig.train()(torch.randn(8, 3, 10))  # BatchNorm statistics that are not (0, 1)
    x = np.random.RandomState(0).randn(4, 3, 10).astype(np.float32)
    report = parity.compare(tsig, torch_to_flax(FlaxSignal(rngs=nnx.Rngs(0)), tsig.state_dict()), x)
    assert report.ok, str(report)
    assert "Flax input (4, 10, 3)" in report.title and report.bn_stats_delta < 1e-5


@pytest.mark.parametrize("layer", ["features.3", "head"])
def test_compare_names_a_layer_whose_weights_were_changed(layer):
    tnet, fnet, x = _example()
    module = fnet.features.layers[3] if layer == "features.3" else fnet.head
    module.kernel.set_value(module.kernel[...] * 1.01)
    report = parity.compare(tnet, fnet, x)
    assert not report.ok and any(f.startswith("eval logits") for f in report.failures)
    d = report.first_divergence
    assert d is not None and d.path == layer and d.delta > 1e-5 and report.divergence_mode == "eval"
    assert f"first divergent layer (eval): {layer} " in str(report)
    assert _row(report, "gradients")[-1] == "FAIL"


def test_compare_names_a_layer_built_differently():
    tnet, _, x = _example()
    fnet = FlaxNet(rngs=nnx.Rngs(0))
    fnet.features.layers[4] = nnx.GroupNorm(32, num_groups=8, epsilon=1e-5, rngs=nnx.Rngs(0))  # torch has 4
    report = parity.compare(tnet, torch_to_flax(fnet, tnet.state_dict()), x)
    assert report.first_divergence is not None and report.first_divergence.path == "features.4"
    assert report.first_divergence.kind == "GroupNorm" and not report.ok


def test_a_train_mode_only_difference_is_searched_in_float64():
    class FrozenBatchNorm2d(BatchNorm2d):  # a subclass takes BatchNorm2d's conversion rule
        def __call__(self, x):
            return (x - self.mean[...]) * jnp.reciprocal(jnp.sqrt(self.var[...] + self.eps)) * self.scale[...] \
                + self.bias[...]  # the running statistics in train mode too

    tnet, _, x = _example()
    fnet = FlaxNet(rngs=nnx.Rngs(0))
    fnet.features.layers[1] = FrozenBatchNorm2d(16)
    report = parity.compare(tnet, torch_to_flax(fnet, tnet.state_dict()), x)
    assert _row(report, "eval logits")[-1] == "PASS"
    assert any(f.startswith("train logits Δ (f64)") for f in report.failures)
    assert report.divergence_mode == "train, float64" and report.first_divergence.path == "features.1"


def _with_stock_batchnorm(momentum: float) -> parity.CompareReport:
    tnet, _, x = _example()
    fnet = FlaxNet(rngs=nnx.Rngs(0))
    fnet.features.layers[1] = nnx.BatchNorm(16, momentum=momentum, rngs=nnx.Rngs(0))
    return parity.compare(tnet, torch_to_flax(fnet, tnet.state_dict()), x)


def test_compare_names_the_batchnorm_traps():
    # torch's momentum=0.1 written into Flax: torch's 0.9; and Flax's biased running variance
    report = _with_stock_batchnorm(0.1)
    assert _row(report, "eval logits")[-1] == "PASS" and _row(report, "gradients")[-1] == "PASS"
    assert _row(report, "BN running statistics")[-1] == "FAIL" and len(report.failures) == 1
    momentum, variance = report.traps
    assert momentum.startswith("features.1.running_mean: momentum: the Flax layer moves its statistics as "
                               "torch momentum=0.9 does, torch's layer has momentum=0.1")
    assert "momentum=0.1 in Flax means 0.9 in torch" in momentum
    assert momentum.endswith("Here: nnx.BatchNorm(momentum=0.9)")
    assert variance.startswith("features.1.running_var differs by the n/(n-1) factor (n = 1024 values per "
                               "channel): nnx.BatchNorm updates with the biased batch variance, torch with "
                               "the unbiased")
    assert f"why: {variance}" in " ".join(str(report).split())  # wrapped at 100 columns

    # Flax's own default, 0.99, is torch's 0.01
    (momentum,) = _with_stock_batchnorm(0.99).traps
    assert "as torch momentum=0.01 does, torch's layer has momentum=0.1" in momentum
    assert "nnx.BatchNorm's default 0.99 is torch's 0.01" in momentum

    # the right momentum: only the variance is left
    report = _with_stock_batchnorm(0.9)
    assert [t.split(" differs")[0] for t in report.traps] == ["features.1.running_var"]


def test_compare_names_an_eps_that_differs():
    tnet, _, x = _example()
    fnet = FlaxNet(rngs=nnx.Rngs(0))
    fnet.features.layers[4] = nnx.GroupNorm(32, num_groups=4, rngs=nnx.Rngs(0))  # nnx's default 1e-6
    report = parity.compare(tnet, torch_to_flax(fnet, tnet.state_dict()), x)
    assert report.eps_mismatches == ["features.4: eps differs: torch GroupNorm(eps=1e-05), Flax "
                                     "GroupNorm(epsilon=1e-06); nnx.LayerNorm and nnx.GroupNorm default to "
                                     "1e-6, torch to 1e-5"]
    assert _row(report, "norm layers' eps") == ("norm layers' eps, torch vs Flax", "1 of 2 differ", "equal",
                                                "features.4", "FAIL")


def test_compare_refuses_pairs_that_do_not_hold_the_same_tensors_or_give_no_logits():
    tnet, fnet, x = _example()
    with pytest.raises(StateDictMismatchError, match="missing:    head.weight"):
        parity.compare(torch.nn.Sequential(), fnet, x)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))
    flax_conv = torch_to_flax(nnx.Sequential(nnx.Conv(3, 2, (1, 1), rngs=R)), conv.state_dict())
    with pytest.raises(ValueError, match=r"compare needs \(N, classes\) logits; the torch model returned shape"):
        parity.compare(conv, flax_conv, x)


# --------------------------------------------------------------------------- docs/porting.md
def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of a markdown text."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)]


def _shape(output: str) -> list[str]:
    """A printed report as what a rerun must repeat: numbers in e-notation masked, table rows cut to
    their quantity and verdict (which tensor is worst is rounding)."""
    lines = []
    for line in output.strip().splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        lines.append(f"{cells[0]} | {cells[-1]}" if cells[-1] in ("PASS", "FAIL", "verdict")
                     else re.sub(r"\d\.\d+e[+-]\d\d", "#", line))
    return lines


def test_the_porting_page_runs_as_written_and_shows_its_real_output():
    blocks = _blocks((ROOT / "docs" / "porting.md").read_text())
    assert blocks[0] == ("python", (ROOT / "parity" / "examples.py").read_text())  # the pair, verbatim
    scope: dict = {}
    runs = [(i, body) for i, (lang, body) in enumerate(blocks) if lang == "python" and i > 0]
    assert len(runs) == 2
    for i, body in runs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(body, f"docs/porting.md block {i}", "exec"), scope)
        lang, shown = blocks[i + 1]
        assert lang == "text" and _shape(out.getvalue()) == _shape(shown), out.getvalue()
    assert scope["report"].ok
