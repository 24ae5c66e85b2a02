"""Conversion: files saved by the material's own code, strict errors, layouts, no aliasing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flaxnets
import torch_ref
from parity import StateDictMismatchError, flax_to_torch, load_state_dict, normalize_keys, torch_to_flax
from parity.check import nchw_to_nhwc
from tests import material_code as M

MATERIAL = {  # registry name -> the note's class as written; forward compared where it is valid
    "lenet": (M.LeNet, True),
    "dilated": (M.MyConvDilaNet, True),
    "net": (M.Net, True),
    "net_dropout": (M.NetDropout, False),  # the note's forward skips conv2
    "net_batchnorm": (M.NetBatchNorm, True),
    "resnet20": (lambda: M.ResNet(M.BasicBlock, [3, 3, 3]), True),
    "densenet121_se": (lambda: M.DenseNet(num_classes=2), False),  # the note's forward drops SE
}


@pytest.mark.parametrize("name", list(MATERIAL))
def test_a_file_saved_by_the_materials_code_loads_strictly(name, tmp_path):
    make, same_forward = MATERIAL[name]
    torch.manual_seed(0)
    original = make().eval()
    torch.save(original.state_dict(), tmp_path / "model.pt")
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    torch_ref.create(name).load_state_dict(sd, strict=True)
    fmodel = torch_to_flax(name, sd)
    if same_forward:
        h, w, c = flaxnets.get_spec(name).check_shape
        x = np.random.RandomState(0).rand(2, c, h, w).astype(np.float32)
        with torch.no_grad():
            want = original(torch.from_numpy(x)).numpy()
        fmodel.eval()
        got = np.asarray(fmodel(jnp.asarray(nchw_to_nhwc(x))))
        assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, np.max(np.abs(want)))


def test_every_key_problem_is_listed_in_one_error():
    sd = torch_ref.create("lenet").state_dict()
    del sd["fc.4.bias"]
    sd["fc.5.weight"] = torch.zeros(3)
    sd["conv.3.weight"] = torch.zeros(16, 6, 3, 3)
    with pytest.raises(StateDictMismatchError) as info:
        torch_to_flax("lenet", sd)
    msg = str(info.value)
    assert "1 missing, 1 unexpected, 1 shape-mismatched" in msg
    assert "missing:    fc.4.bias" in msg and "unexpected: fc.5.weight" in msg
    assert "conv.3.weight: model expects (16, 6, 5, 5), state_dict has (16, 6, 3, 3)" in msg
    assert info.value.missing == ["fc.4.bias"]


def test_a_failed_load_leaves_the_model_untouched():
    model = flaxnets.create("net")
    before = np.array(model.conv1.kernel[...])
    sd = torch_ref.create("net").state_dict()
    sd.pop("fc2.bias")
    with pytest.raises(StateDictMismatchError):
        load_state_dict(model, sd)
    np.testing.assert_array_equal(model.conv1.kernel[...], before)


def test_missing_num_batches_tracked_is_an_error_not_a_default():
    sd = torch_ref.create("net_batchnorm").state_dict()
    del sd["conv1_batchnorm.num_batches_tracked"]
    with pytest.raises(StateDictMismatchError, match="missing:    conv1_batchnorm.num_batches_tracked"):
        torch_to_flax("net_batchnorm", sd)


def test_flax_weights_do_not_alias_the_torch_tensors():
    tmodel = torch_ref.create("net_batchnorm")
    fmodel = torch_to_flax("net_batchnorm", tmodel.state_dict())
    before = np.array(fmodel.conv1_batchnorm.mean[...])
    with torch.no_grad():
        tmodel.train()(torch.rand(4, 3, 32, 32))  # updates torch's running stats in place
        tmodel.conv1.weight.add_(1.0)
    np.testing.assert_array_equal(fmodel.conv1_batchnorm.mean[...], before)
    assert not np.allclose(fmodel.conv1.kernel[...], np.transpose(tmodel.conv1.weight.detach().numpy(), (2, 3, 1, 0)))


def test_layouts_follow_the_module_type_rules():
    torch.manual_seed(0)
    t = torch_ref.create("net_batchnorm")
    f = torch_to_flax("net_batchnorm", t.state_dict())
    np.testing.assert_array_equal(f.conv1.kernel[...], t.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(f.fc1.kernel[...], t.fc1.weight.detach().numpy().T)
    np.testing.assert_array_equal(f.conv1_batchnorm.var[...], t.conv1_batchnorm.running_var.numpy())


def test_class_count_is_read_from_the_classifier():
    sd = torch_ref.create("resnet20", num_classes=100).state_dict()
    model = torch_to_flax("resnet20", sd)
    model.eval()
    assert model(jnp.zeros((1, 32, 32, 3))).shape == (1, 100)


def test_flax_to_torch_loads_strictly_with_num_batches_tracked():
    for name in ["net_batchnorm", "resnet20", "densenet121_se"]:
        sd = flax_to_torch(flaxnets.create(name, seed=3))
        assert sd["features.norm0.num_batches_tracked" if "dense" in name else next(
            k for k in sd if k.endswith("num_batches_tracked"))].dtype == torch.int64
        result = torch_ref.create(name).load_state_dict(sd, strict=True)
        assert not result.missing_keys and not result.unexpected_keys


def test_flax_torch_flax_round_trip_is_bit_exact():
    fmodel = flaxnets.create("resnet20", option="B", seed=5)
    back = torch_to_flax("resnet20", flax_to_torch(fmodel), option="B")
    from flax import nnx

    for (p1, a), (p2, b) in zip(nnx.to_flat_state(nnx.state(fmodel)), nnx.to_flat_state(nnx.state(back))):
        assert p1 == p2
        assert a[...].dtype == b[...].dtype
        np.testing.assert_array_equal(a[...], b[...])


def test_old_torchvision_densenet_keys_are_renamed():
    sd = {"features.denseblock1.denselayer1.norm.1.weight": 1,
          "features.denseblock3.denselayer24.conv.2.weight": 2,
          "features.transition1.norm.weight": 3}
    assert list(normalize_keys(sd)) == ["features.denseblock1.denselayer1.norm1.weight",
                                        "features.denseblock3.denselayer24.conv2.weight",
                                        "features.transition1.norm.weight"]


@pytest.mark.parametrize("name", ["lenet", "net_batchnorm", "resnet20", "densenet121_se"])
def test_exported_keys_follow_torchs_own_order(name):
    """A state_dict from Flax lists its keys as torch does (a diff of key lists stays readable)."""
    assert list(flax_to_torch(flaxnets.create(name))) == list(torch_ref.create(name).state_dict())
