"""The zoo's facts: parameter counts, output shapes, init distributions, train/eval behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flaxnets
import torch_ref
import torch_ref.layers
from flaxnets import layers
from flaxnets.layers import Conv2D, corr2d
from flaxnets.introspect import count_params
from parity.convert import to_numpy_state_dict
from tests.child import by_tier

# the table of nets, written out again on purpose: the registry must agree with it
PARAMS = {
    "lenet": 44_426, "dilated": 170_314, "net": 18_090, "net_width": 38_386, "net_dropout": 38_386,
    "net_batchnorm": 38_482, "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586,
    "resnet56": 853_018, "resnet110": 1_727_962, "resnet1202": 19_421_274, "densenet121": 7_978_856,
    "densenet169": 14_149_480, "densenet201": 20_013_928, "densenet121_se": 7_218_050,
}


def test_registry_lists_every_net_of_the_table():
    assert flaxnets.list_nets() == list(PARAMS)


def test_the_densenets_are_the_nets_of_many_small_ops_and_load_abstract():
    """``many_small_ops``: parity checks run these jitted, ``create_for_loading`` builds them
    from shapes only; every other net is created (resnet1202 would trace for minutes)."""
    many = [n for n in flaxnets.list_nets() if flaxnets.get_spec(n).many_small_ops]
    assert many == ["densenet121", "densenet169", "densenet201", "densenet121_se"]
    abstract = flaxnets.create_for_loading("densenet121_se")
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(nnx.state(abstract)))
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(nnx.state(flaxnets.create_for_loading("lenet"))))


@pytest.mark.parametrize("name", by_tier(list(PARAMS)))
def test_parameter_counts_and_output_shapes(name):
    spec = flaxnets.get_spec(name)
    fmodel = flaxnets.create(name)
    tmodel = torch_ref.create(name)
    assert count_params(fmodel) == PARAMS[name] == spec.params
    assert sum(p.numel() for p in tmodel.parameters()) == PARAMS[name]
    # the registry's BatchNorm flag (it decides whether a partial last batch trains) is the models'
    assert bool(jax.tree.leaves(nnx.state(fmodel, nnx.BatchStat))) == spec.batch_norm
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in tmodel.modules()) == spec.batch_norm
    h, w, c = spec.input_shape
    graphdef, state = nnx.split(fmodel)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((3, h, w, c), jnp.float32))
    assert out.shape == (3, spec.num_classes) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", by_tier(["lenet", "net_batchnorm", "resnet20", "densenet121_se"]))
def test_num_classes_is_a_constructor_argument(name):
    h, w, c = flaxnets.get_spec(name).check_shape
    fmodel = flaxnets.create(name, num_classes=7)
    fmodel.eval()
    assert nnx.jit(lambda m, x: m(x))(fmodel, jnp.zeros((1, h, w, c))).shape == (1, 7)
    assert torch_ref.create(name, num_classes=7).eval()(torch.zeros(1, c, h, w)).shape == (1, 7)


def test_unknown_net_lists_the_valid_ones():
    with pytest.raises(KeyError, match="valid nets: lenet, dilated"):
        flaxnets.create("lenet5")
    with pytest.raises(KeyError, match="unknown net 'vgg'"):
        torch_ref.create("vgg")


def test_resnet_option_b_has_projection_shortcuts():
    f = flaxnets.create("resnet20", option="B")
    t = torch_ref.create("resnet20", option="B")
    keys = set(to_numpy_state_dict(f))
    assert keys == set(t.state_dict())
    assert "layer2.0.shortcut.0.weight" in keys and "layer2.0.shortcut.1.running_var" in keys
    with pytest.raises(ValueError, match="'A' or 'B'"):
        flaxnets.create("resnet20", option="C")


# --------------------------------------------------------------------------- initialisation
INIT_NETS = [("lenet", {}), ("dilated", {}), ("net_batchnorm", {}), ("resnet20", {"option": "B"}),
             ("densenet121_se", {})]


@pytest.mark.parametrize("name,kw", INIT_NETS)
def test_flax_init_draws_from_the_torch_distributions(name, kw):
    """Per parameter: same mean and std as torch's init, within sampling error (6σ)."""
    torch.manual_seed(0)
    t_sd = {k: v.double().numpy() for k, v in torch_ref.create(name, **kw).state_dict().items()}
    f_sd = to_numpy_state_dict(flaxnets.create(name, seed=1, **kw))
    assert set(t_sd) == set(f_sd)
    checked = 0
    for key, t in t_sd.items():
        f = f_sd[key].astype(np.float64)
        if t.std() == 0:  # constants (BN ones/zeros, zero biases) must be the same constants
            np.testing.assert_array_equal(f, t, err_msg=key)
            continue
        if t.size < 100:
            continue  # too few draws for a statistical comparison
        n, sd = t.size, t.std()
        assert abs(f.mean() - t.mean()) <= 6 * sd * np.sqrt(2 / n), key
        assert abs(f.std() / sd - 1) <= 6 * np.sqrt(1 / n), (key, f.std(), sd)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("shape", [(), (0,), (7,), (5, 5, 1, 6), (3, 3, 64, 32)])
def test_initialisers_give_the_numbers_of_a_direct_draw(shape):
    """The power-of-two draws cut to shape (one compiled program per length) are jax.random's
    own numbers for ``shape``, eager and traced."""
    key = jax.random.key(7)
    bound, std = 1 / np.sqrt(27), np.sqrt(2 / 27)
    inits = (layers.torch_uniform(27), layers.kaiming_normal(27))

    def direct(k):
        return (jax.random.uniform(k, shape, jnp.float32, -bound, bound),
                std * jax.random.normal(k, shape, jnp.float32))

    # eager against eager, jitted against jitted (the key an argument, then closed over): jitted,
    # XLA fuses the scale into the draw and rounds 1 ulp off the eager product
    for got, want in (([i(key, shape) for i in inits], direct(key)),
                      (jax.jit(lambda k: [i(k, shape) for i in inits])(key), jax.jit(direct)(key)),
                      (jax.jit(lambda: [i(key, shape) for i in inits])(),
                       jax.jit(lambda: direct(key))())):
        for g, d in zip(got, want):
            assert g.shape == shape and g.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(g), np.asarray(d))


def test_creating_a_densenet_compiles_a_few_programs_not_one_per_layer_shape():
    """Eagerly, every new shape is a new XLA program; random draws in power-of-two lengths and
    BatchNorm's constants made on the host keep DenseNet-121's creation to a few programs."""
    compiles = []

    def listen(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.clear_caches()  # a fresh process's view: nothing compiled yet
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        model = flaxnets.create("densenet121")
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert count_params(model) == PARAMS["densenet121"]
    assert 0 < len(compiles) <= 20, len(compiles)


# --------------------------------------------------------------------------- train / eval
def test_train_and_eval_switch_dropout_like_torch():
    model = flaxnets.create("net_dropout")
    x = jnp.asarray(np.random.RandomState(0).rand(4, 32, 32, 3), jnp.float32)
    model.train()
    a, b = model(x), model(x)
    assert not np.allclose(a, b), "dropout must be active in train mode"
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


def test_batchnorm_uses_batch_stats_in_train_and_running_stats_in_eval():
    model = flaxnets.create("net_batchnorm")
    x = jnp.asarray(np.random.RandomState(0).rand(8, 32, 32, 3), jnp.float32)
    model.eval()
    before = np.array(model.conv1_batchnorm.mean[...])
    y_eval = model(x)
    np.testing.assert_array_equal(model.conv1_batchnorm.mean[...], before)
    model.train()
    y_train = model(x)
    assert not np.allclose(y_eval, y_train)
    assert not np.allclose(model.conv1_batchnorm.mean[...], before)
    assert int(model.conv1_batchnorm.num_batches_tracked[...]) == 1


def test_batchnorm_running_variance_is_unbiased_like_torch():
    from flaxnets.layers import BatchNorm2d

    x = np.random.RandomState(0).randn(2, 3, 3, 4).astype(np.float32)
    bn = BatchNorm2d(4)
    bn(jnp.asarray(x))
    tbn = torch.nn.BatchNorm2d(4)
    tbn(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(bn.var[...], tbn.running_var.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bn.mean[...], tbn.running_mean.numpy(), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- from scratch
def test_corr2d_gives_the_notes_example():
    X = jnp.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    K = jnp.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(corr2d(X, K), [[19.0, 25.0], [37.0, 43.0]])
    np.testing.assert_array_equal(torch_ref.layers.corr2d(torch.tensor(X.tolist()), torch.tensor(K.tolist())),
                                  [[19.0, 25.0], [37.0, 43.0]])


def test_corr2d_edge_detection_matches_torch():
    X = np.ones((6, 8), np.float32)
    X[:, 2:6] = 0
    K = np.array([[1.0, -1.0]], np.float32)
    y = np.asarray(corr2d(jnp.asarray(X), jnp.asarray(K)))
    np.testing.assert_array_equal(y, torch_ref.layers.corr2d(torch.from_numpy(X), torch.from_numpy(K)).numpy())
    assert (y[:, 1] == 1).all() and (y[:, 5] == -1).all() and np.count_nonzero(y) == 12


def test_conv2d_from_scratch_converts_and_matches():
    from parity.convert import load_state_dict

    torch.manual_seed(0)
    t = torch_ref.layers.Conv2D((1, 2))
    f = load_state_dict(Conv2D((1, 2), rngs=nnx.Rngs(0)), t.state_dict())
    x = np.random.RandomState(0).rand(6, 8).astype(np.float32)
    np.testing.assert_allclose(f(jnp.asarray(x)), t(torch.from_numpy(x)).detach().numpy(), rtol=1e-6)
