"""parity.optim: optimizer state between optax and torch.optim, for every recipe's optimizer.

After the same k steps in both frameworks from the same weights, converting one side's state
gives the other's within float32 rounding; torch -> optax -> torch and optax -> torch -> optax are
exact; what does not fit is one OptimizerStateError line.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flaxnets
import torch_ref
from flaxnets.checkpoint import leaf_names
from flaxnets.engine import make_optimizer, update_step
from flaxnets.fit import lr_schedule
from flaxnets.recipes import recipe_for
from parity.convert import torch_to_flax, to_numpy_state_dict
from parity.optim import (OptimizerStateError, optimizer_state_from_torch, optimizer_state_to_torch,
                          optimizer_tensors, param_names)
from torch_ref.engine import make_optimizer as make_torch_optimizer, train_step

K = 3  # steps in each framework
# (net, recipe): Adam; SGD without momentum; the ResNets' SGD with momentum, weight decay and a
# milestone inside the K steps (one step per epoch), on a small BatchNorm net (L2 in the loss too)
CASES = {
    "adam": ("lenet", recipe_for("lenet", batch_size=8)),
    "sgd": ("net", recipe_for("net", batch_size=8, lr=0.05)),
    "sgd_momentum": ("net_batchnorm", dataclasses.replace(
        recipe_for("resnet20"), batch_size=8, milestones=(2,), augment="none", normalize="unit",
        l2=1e-3)),
}
STEPS_PER_EPOCH = 1


def train_both(net: str, recipe, k: int = K, seed: int = 0):
    """k optimizer steps of the same batches in torch and JAX from the same weights; returns
    (torch model, torch optimizer, Flax model holding the weights, optax state, batches)."""
    torch.manual_seed(seed)
    tmodel = torch_ref.create(net)
    fmodel = torch_to_flax(net, tmodel.state_dict())
    h, w, c = flaxnets.get_spec(net).input_shape
    rng = np.random.default_rng(seed)
    batches = [(rng.random((recipe.batch_size, h, w, c), np.float32),
                rng.integers(0, flaxnets.get_spec(net).num_classes, recipe.batch_size))
               for _ in range(k + 1)]
    lr_at = lr_schedule(recipe, STEPS_PER_EPOCH)

    opt = make_torch_optimizer(recipe, tmodel.parameters())
    tmodel.train()
    for i, (x, y) in enumerate(batches[:k]):
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        train_step(tmodel, opt, torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y), recipe)

    fmodel.train()
    gd, params, rest = nnx.split(fmodel, nnx.Param, ...)
    tx = make_optimizer(recipe, STEPS_PER_EPOCH)[0]
    step = jax.jit(lambda s, o, x, y: update_step(gd, s, o, x, y, jnp.ones(len(y), bool), tx=tx,
                                                  recipe=recipe))
    state, opt_state = (params, rest), tx.init(params)
    for x, y in batches[:k]:
        state, opt_state, _ = step(state, opt_state, jnp.asarray(x), jnp.asarray(y, jnp.int32))
    nnx.update(fmodel, *state)
    return tmodel, opt, fmodel, opt_state, batches


@pytest.fixture(scope="module", params=list(CASES))
def trained(request):
    net, recipe = CASES[request.param]
    return (request.param, recipe, *train_both(net, recipe))


def last_part(name: str) -> str:
    return name.rsplit(".", 1)[1]


def assert_close_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float,
                         kind=last_part) -> None:
    """Same names; each tensor within rtol of its largest value, or of 1 % of the largest tensor
    of its kind (a conv bias before BatchNorm has a gradient of rounding only: measured 3e-7
    off in float32, the conv weight's own rounding, where the buffer holds 1e-3 of weight decay)."""
    assert list(a) == list(b)
    top: dict[str, float] = {}
    for k in a:
        top[kind(k)] = max(top.get(kind(k), 0.0), float(np.max(np.abs(a[k]), initial=0.0)))
    for k in a:
        scale = max(float(np.max(np.abs(a[k]), initial=0.0)), 1e-2 * top[kind(k)], 1e-30)
        delta = float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)), initial=0.0))
        assert delta <= rtol * scale, (k, delta, scale)


def test_param_names_are_torchs_named_parameters_order():
    """Also for models whose attributes nnx.clone or nnx.eval_shape has sorted."""
    for net in ("lenet", "dilated", "net_batchnorm", "resnet20"):
        want = [n for n, _ in torch_ref.create(net).named_parameters()]
        model = flaxnets.create(net)
        assert param_names(model) == param_names(nnx.clone(model)) == want
    want = [n for n, _ in torch_ref.create("densenet121_se").named_parameters()]
    assert param_names(flaxnets.create_for_loading("densenet121_se")) == want
    narrow = flaxnets.create("net_width", n_channel=8)  # another width: the names decide the order
    assert param_names(narrow) == [n for n, _ in torch_ref.create("net_width", n_channel=8).named_parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("net", flaxnets.list_nets())
def test_param_names_of_every_net(net):
    assert param_names(flaxnets.create(net)) == [n for n, _ in torch_ref.create(net).named_parameters()]


def test_the_weights_agree_after_k_steps(trained):
    """The premise of the comparisons below: both frameworks took the same k steps."""
    _, _, tmodel, _, fmodel, _, _ = trained
    want = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    got = to_numpy_state_dict(fmodel)
    assert_close_tensors({k: want[k] for k in got}, dict(got), rtol=2e-5)


def test_jax_state_converted_is_torchs_state(trained):
    kind, recipe, tmodel, opt, fmodel, opt_state, _ = trained
    names = [n for n, _ in tmodel.named_parameters()]
    lr = opt.param_groups[0]["lr"]
    got = optimizer_state_to_torch(opt_state, fmodel, recipe, lr)
    want = opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    tg, tw = optimizer_tensors(got, names), optimizer_tensors(want, names)
    assert_close_tensors(tw, tg, rtol=1e-4)
    slots = {"adam": {"step", "exp_avg", "exp_avg_sq"}, "sgd": set(), "sgd_momentum": {"momentum_buffer"}}[kind]
    assert {k.rsplit(".", 1)[1] for k in tw} == slots and len(tw) == len(slots) * len(names)
    if kind == "adam":
        assert {float(v) for k, v in tg.items() if k.endswith(".step")} == {float(K)}
        assert got["state"][0]["step"].dtype == want["state"][0]["step"].dtype


def test_torch_state_converted_is_jaxs_state(trained):
    kind, recipe, tmodel, opt, fmodel, opt_state, _ = trained
    got = optimizer_state_from_torch(opt.state_dict(), fmodel, recipe, STEPS_PER_EPOCH, step=K)
    assert jax.tree.structure(got) == jax.tree.structure(opt_state)
    assert [(a.dtype, a.shape) for a in jax.tree.leaves(got)] == [
        (b.dtype, b.shape) for b in jax.tree.leaves(opt_state)]
    named = [{".".join(n): np.asarray(a) for n, a in zip(leaf_names(t), jax.tree.leaves(t))}
             for t in (opt_state, got)]
    counts = [k for k in named[0] if k.endswith("count")]  # Adam's count and the schedule's position
    assert counts and all(int(named[0][k]) == int(named[1][k]) == K for k in counts)
    assert_close_tensors(*named, rtol=1e-4, kind=lambda k: next(
        (p for p in k.split(".") if p in ("mu", "nu", "trace")), k))


def test_a_converted_state_trains_on_as_the_original(trained):
    """torch, given the optimizer state converted from JAX, takes step k+1 as its own state does."""
    _, recipe, tmodel, opt, fmodel, opt_state, batches = trained
    names = param_names(fmodel)
    lr = lr_schedule(recipe, STEPS_PER_EPOCH)(K)
    runs = []
    for state in (opt.state_dict(), optimizer_state_to_torch(opt_state, fmodel, recipe, lr)):
        twin = copy.deepcopy(tmodel)  # the fixture's model and optimizer stay as they are
        o = make_torch_optimizer(recipe, twin.parameters())
        o.load_state_dict(copy.deepcopy(state))  # torch would share the tensors
        for g in o.param_groups:
            g["lr"] = lr
        x, y = batches[K]
        train_step(twin, o, torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y), recipe)
        runs.append({k: v.detach().numpy() for k, v in twin.state_dict().items()})
    a, b = runs
    assert not np.array_equal(a[names[0]], tmodel.state_dict()[names[0]].numpy())  # it stepped
    assert_close_tensors(a, b, rtol=2e-5)


def test_round_trips_are_exact(trained):
    _, recipe, tmodel, opt, fmodel, opt_state, _ = trained
    names = param_names(fmodel)
    sd = opt.state_dict()
    lr = sd["param_groups"][0]["lr"]
    back = optimizer_state_to_torch(optimizer_state_from_torch(sd, fmodel, recipe, STEPS_PER_EPOCH, step=K),
                                    fmodel, recipe, lr)
    assert back["param_groups"] == sd["param_groups"]
    a, b = optimizer_tensors(sd, names), optimizer_tensors(back, names)
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    again = optimizer_state_from_torch(optimizer_state_to_torch(opt_state, fmodel, recipe, lr), fmodel,
                                       recipe, STEPS_PER_EPOCH, step=K)
    assert jax.tree.structure(again) == jax.tree.structure(opt_state)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(opt_state)))


def test_before_the_first_step_torch_has_no_state_and_optax_zeros():
    for net, recipe in CASES.values():
        fmodel = flaxnets.create(net)
        params = nnx.split(fmodel, nnx.Param, ...)[1]
        init = make_optimizer(recipe, 5)[0].init(params)
        sd = optimizer_state_to_torch(init, fmodel, recipe, recipe.lr)
        assert sd["state"] == {}
        assert sd == make_torch_optimizer(recipe, torch_ref.create(net).parameters()).state_dict()
        back = optimizer_state_from_torch(sd, fmodel, recipe, 5, step=0)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(init)))


def test_optimizer_tensors_names_every_tensor():
    sd = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones(2)}, 1: {"momentum_buffer": None}},
          "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    got = optimizer_tensors(sd, ["a.weight", "a.bias"])
    assert list(got) == ["a.weight.step", "a.weight.exp_avg"]
    assert got["a.weight.step"].shape == () and got["a.weight.exp_avg"].dtype == np.float32


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    return msg


def test_what_does_not_fit_is_one_clear_error(trained):
    kind, recipe, tmodel, opt, fmodel, opt_state, _ = trained
    sd = opt.state_dict()
    other = {"adam": recipe_for("net"), "sgd": recipe_for("lenet"), "sgd_momentum": recipe_for("lenet")}[kind]
    with pytest.raises(OptimizerStateError) as e:
        optimizer_state_from_torch(sd, fmodel, other, 1, step=K)
    assert "the optimizer state comes from " in _one_line(e) and "; the recipe trains with " in str(e.value)
    lenet = flaxnets.create("lenet" if kind != "adam" else "net")  # 10 parameters against 8 or 12
    with pytest.raises(OptimizerStateError, match=r"the optimizer state holds \d+ parameters, the net has \d+") as e:
        optimizer_state_from_torch(sd, lenet, recipe, 1, step=K)
    _one_line(e)
    with pytest.raises(OptimizerStateError, match="not a torch optimizer state_dict"):
        optimizer_state_from_torch({"model": {}}, fmodel, recipe, 1, step=K)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["weight_decay"] = 0.5
    with pytest.raises(OptimizerStateError, match=r"settings differ from the recipe's: weight_decay 0.5") as e:
        optimizer_state_from_torch(bad, fmodel, recipe, 1, step=K)
    _one_line(e)
    if kind == "sgd":
        with pytest.raises(OptimizerStateError, match="SGD keeps no step count: pass step="):
            optimizer_state_from_torch(sd, fmodel, recipe, 1)
        return
    slot = "exp_avg" if kind == "adam" else "momentum_buffer"
    bad = copy.deepcopy(sd)
    bad["state"][0][slot] = bad["state"][0][slot][..., :1]
    name = param_names(fmodel)[0]
    with pytest.raises(OptimizerStateError, match=rf"the optimizer's {slot} of {name} \(parameter 0\) "
                                                  rf"has shape \(.*\), the parameter \(.*\)") as e:
        optimizer_state_from_torch(bad, fmodel, recipe, 1, step=K)
    _one_line(e)
    if kind == "adam":
        bad = copy.deepcopy(sd)
        bad["state"][1]["step"] = torch.tensor(7.0)
        with pytest.raises(OptimizerStateError, match="Adam step counts differ"):
            optimizer_state_from_torch(bad, fmodel, recipe, 1)
        with pytest.raises(OptimizerStateError, match=f"the Adam step count is {K}, not the 9 steps given"):
            optimizer_state_from_torch(sd, fmodel, recipe, 1, step=9)
