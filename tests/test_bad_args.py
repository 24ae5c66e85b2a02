"""Bad numbers and arguments are refused with one clear line: the scripts' options, ``create``'s
arguments, a batch in the wrong layout, and what ``torch_to_flax`` is handed."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flaxnets
import parity
import torch_ref
from flaxnets.data import write_idx
from flaxnets.layers import ImageClassifier
from flaxnets.registry import check_batch_shape, list_nets, model_class

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import evaluate as evaluate_script  # noqa: E402  (scripts/evaluate.py)

# scripts/parity.py shares its name with the parity package: load it under another
_spec = importlib.util.spec_from_file_location("parity_script", ROOT / "scripts" / "parity.py")
parity_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity_script)


def one_error_line(err: str, flag: str) -> str:
    """stderr holds one line (argparse: its usage line, then one error line) naming ``flag``."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines, err
    last = lines[-1]
    assert last.startswith("error:") or re.match(r"\S+: error: ", last), err  # argparse: PROG: error:
    assert flag in last, err
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("usage:")), err
    return last


# --------------------------------------------------------------------------- scripts/evaluate.py
@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory) -> tuple[Path, Path]:
    """A lenet weights file and a FashionMNIST-shaped IDX directory of 40 test images."""
    d = tmp_path_factory.mktemp("bad_args")
    weights = d / "lenet.pt"
    torch.save(parity.flax_to_torch(flaxnets.create("lenet")), weights)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 40)):
        write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return weights, d


def run_evaluate(lenet_files, tmp_path, *extra: str) -> int:
    weights, data = lenet_files
    return evaluate_script.main(["--net", "lenet", "--weights", str(weights), "--data-dir", str(data),
                                 "--out", str(tmp_path / "ev"), *extra])


def test_evaluate_runs_with_good_options(lenet_files, tmp_path, capsys):
    """The control: the same files and a batch size that leaves a partial batch evaluate."""
    assert run_evaluate(lenet_files, tmp_path, "--batch-size", "7", "--mean", "0.5", "--std", "0.25") == 0
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("extra, flag, says", [
    (["--mean", "0.5", "--std", "nan"], "--std", "finite"),
    (["--mean", "inf", "--std", "0.5"], "--mean", "finite"),
    (["--mean=-inf", "--std", "inf"], "--mean", "finite"),
    (["--std", "nan"], "--std", "finite"),
    (["--mean", "0.5", "--std", "0"], "--std", "positive"),
    (["--mean", "0.5", "--std", "-1"], "--std", "positive"),
    (["--batch-size", "0"], "--batch-size", "at least 1, got 0"),
    (["--batch-size", "-3"], "--batch-size", "at least 1, got -3"),
    (["--seed", "-1"], "--seed", "at least 0, got -1"),
])
def test_evaluate_refuses_bad_numbers_in_one_line(lenet_files, tmp_path, capsys, extra, flag, says):
    assert run_evaluate(lenet_files, tmp_path, *extra) == 1
    captured = capsys.readouterr()
    assert says in one_error_line(captured.err, flag)
    assert "accuracy" not in captured.out and not (tmp_path / "ev").exists()


def test_evaluate_api_checks_options_before_reading_anything(tmp_path):
    from flaxnets.evaluate import evaluate

    missing = tmp_path / "no-such-weights.pt"  # the options are refused before this is looked for
    with pytest.raises(ValueError, match=r"^--batch-size must be at least 1, got 0$"):
        evaluate("lenet", missing, batch_size=0)
    with pytest.raises(TypeError, match=r"^--batch-size must be an int, got 2\.5 \(float\)$"):
        evaluate("lenet", missing, batch_size=2.5)
    with pytest.raises(ValueError, match=r"^--std values must be finite numbers, got nan$"):
        evaluate("lenet", missing, mean=(0.5,), std=(float("nan"),))
    with pytest.raises(ValueError, match=r"^unknown backend 'tf'; expected 'jax' or 'torch'$"):
        evaluate("lenet", missing, backend="tf")


def test_evaluate_help_explains_backend_and_batch_size(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_script.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--backend {jax,torch} framework that runs the net" in text
    assert "--batch-size BATCH_SIZE images per forward pass (at least 1; default 256)" in text


# --------------------------------------------------------------------------- scripts/parity.py
@pytest.mark.parametrize("extra, flag", [(["--batch", "0"], "--batch"), (["--batch", "-2"], "--batch"),
                                         (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed")])
def test_parity_script_refuses_bad_numbers(capsys, extra, flag):
    with pytest.raises(SystemExit) as e:
        parity_script.main(["--net", "lenet", *extra])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert one_error_line(captured.err, flag).endswith(f"error: {flag} must be " + {
        "--batch": f"at least 1, got {extra[1]}", "--seed": f"between 0 and {2**32 - 1}, got {extra[1]}"}[flag])
    assert captured.out == ""  # nothing was checked


def test_parity_help_tells_the_default_cost_and_the_exit_status(capsys):
    with pytest.raises(SystemExit) as e:
        parity_script.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"checks all {len(list_nets()) + 1} nets" in text and "about ten minutes on a 2-core CPU" in text
    assert "exit status: 0 if every check passed, 1 if any failed" in text and "2 for a usage error" in text


# --------------------------------------------------------------------------- flaxnets.create
@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, "num_classes must be at least 1, got 0"),
    (-3, ValueError, "num_classes must be at least 1, got -3"),
    (2.5, TypeError, r"num_classes must be an int, got 2\.5 \(float\)"),
    ("10", TypeError, r"num_classes must be an int, got '10' \(str\)"),
    (True, TypeError, r"num_classes must be an int, got True \(bool\)"),
])
def test_create_refuses_a_bad_class_count(value, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        flaxnets.create("lenet", num_classes=value)


def test_create_takes_one_class_and_numpy_ints():
    assert flaxnets.create("lenet", num_classes=1).fc[4].out_features == 1
    assert flaxnets.create("lenet", num_classes=np.int64(3), seed=np.int32(1)).fc[4].out_features == 3


@pytest.mark.parametrize("value, error, message", [
    (None, TypeError, r"seed must be an int, got None \(NoneType\)"),
    ("x", TypeError, r"seed must be an int, got 'x' \(str\)"),
    (1.5, TypeError, r"seed must be an int, got 1\.5 \(float\)"),
    (2**64, ValueError, f"seed must be at most {2**63 - 1}, got {2**64}"),
])
def test_create_refuses_a_bad_seed(value, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        flaxnets.create("lenet", seed=value)


def test_create_refuses_an_argument_the_net_does_not_take():
    with pytest.raises(TypeError, match=r"^net 'lenet' \(LeNet\) takes no argument 'foo'; its arguments: "
                                        r"num_classes$"):
        flaxnets.create("lenet", foo=1)
    with pytest.raises(TypeError, match=r"^net 'net' \(Net\) takes no argument 'n_channel'; its arguments: "
                                        r"num_classes$"):
        flaxnets.create("net", n_channel=8)  # Net fixes its width; NetWidth takes it
    with pytest.raises(TypeError, match=r"'resnet20' \(ResNet\) takes no argument 'blocks'; its arguments: "
                                        r"num_classes, depth, option$"):
        flaxnets.create("resnet20", blocks=3)
    assert flaxnets.create("net_width", n_channel=8).conv1.out_features == 8


def test_create_refuses_a_name_that_is_not_a_string():
    with pytest.raises(TypeError, match=r"^net name must be a str, got 3 \(int\); valid nets: lenet, "):
        flaxnets.create(3)
    with pytest.raises(TypeError, match=r"^net name must be a str, got \['lenet'\] \(list\)"):
        flaxnets.create(["lenet"])


def test_the_shared_validator_guards_torch_ref_create_too():
    """torch_ref.create does not call it yet: what ``constructor`` answers for the torch classes."""
    from flaxnets.registry import constructor

    cls, kwargs = constructor("torch_ref", "resnet20", 7, {"option": "B"})
    assert cls is type(torch_ref.create("resnet20")) and kwargs == {"depth": 20, "option": "B", "num_classes": 7}
    with pytest.raises(TypeError, match=r"^num_classes must be an int, got '10' \(str\)$"):
        constructor("torch_ref", "lenet", "10")
    with pytest.raises(TypeError, match=r"^net 'lenet' \(LeNet\) takes no argument 'rngs'; its arguments: "
                                        r"num_classes$"):
        constructor("torch_ref", "lenet", None, {"rngs": 0})


# --------------------------------------------------------------------------- the batch layout
def test_an_nchw_batch_is_refused_with_the_transpose_to_use():
    model = flaxnets.create("lenet")
    nchw = (r"^LeNet expects an NHWC batch \(N, 28, 28, 1\), got \(2, 1, 28, 28\); a torch-layout "
            r"\(NCHW\) batch needs x\.transpose\(0, 2, 3, 1\)")
    with pytest.raises(ValueError, match=nchw + "$"):
        model(jnp.zeros((2, 1, 28, 28)))
    graphdef, state = nnx.split(model)
    with pytest.raises(ValueError, match=nchw):  # jit adds a note on JAX's filtered traceback
        jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, jnp.zeros((2, 1, 28, 28)))
    assert model(jnp.zeros((2, 1, 28, 28)).transpose(0, 2, 3, 1)).shape == (2, 10)


@pytest.mark.parametrize("shape, hint", [
    ((2, 28, 28, 3), ""),  # 3 channels used to run: a grouped convolution
    ((2, 32, 32, 1), ""),
    ((28, 28, 1), "; a single image needs a batch axis: x[None]"),
    ((2, 784), ""),
])
def test_a_wrong_channel_count_size_or_rank_is_refused(shape, hint):
    with pytest.raises(ValueError) as e:
        flaxnets.create("lenet")(jnp.zeros(shape))
    assert str(e.value) == f"LeNet expects an NHWC batch (N, 28, 28, 1), got {shape}{hint}"


def test_an_any_size_net_takes_any_size_in_nhwc_only():
    model = nnx.eval_shape(lambda: flaxnets.create("densenet121", block_config=(1, 1, 1, 1)))
    graphdef, state = nnx.split(model)

    def out(shape):
        forward = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
        return jax.eval_shape(forward, state, jax.ShapeDtypeStruct(shape, jnp.float32)).shape

    assert out((2, 48, 40, 3)) == (2, 1000) and out((1, 32, 32, 3)) == (1, 1000)
    want = r"^DenseNet expects an NHWC batch \(N, H, W, 3\) with H, W >= 32, got "
    with pytest.raises(ValueError, match=want + r"\(2, 3, 64, 64\); a torch-layout"):
        out((2, 3, 64, 64))
    with pytest.raises(ValueError, match=want + r"\(2, 16, 16, 3\)(\n|$)"):  # then, maybe, jax's note
        out((2, 16, 16, 3))


@pytest.mark.parametrize("name", list_nets())
def test_every_registered_net_checks_its_batch(name):
    cls = model_class("flaxnets", name)[0]
    h, w, c = flaxnets.get_spec(name).check_shape
    assert issubclass(cls, ImageClassifier)
    check_batch_shape(cls, (2, h, w, c))
    with pytest.raises(ValueError, match=rf"^{cls.__name__} expects an NHWC batch .*x\.transpose"):
        check_batch_shape(cls, (2, c, h, w))


def test_the_check_runs_at_trace_time_only(monkeypatch):
    import flaxnets.layers as layers

    calls = []
    monkeypatch.setattr(layers, "check_batch_shape", lambda cls, shape: calls.append(shape))
    model = flaxnets.create("lenet")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    for _ in range(3):
        forward(state, jnp.zeros((2, 28, 28, 1))).block_until_ready()
    assert calls == [(2, 28, 28, 1)]


# --------------------------------------------------------------------------- parity.torch_to_flax
HOW = (r"pass module\.state_dict\(\), or for a file w = parity\.read_weights\(path, 'lenet'\) and "
       r"torch_to_flax\('lenet', w\.state_dict\)$")


def test_torch_to_flax_refuses_a_module_a_path_or_a_weights_object(tmp_path):
    tmodel = torch_ref.create("lenet")
    with pytest.raises(TypeError, match=r"^torch_to_flax takes a state_dict \(a mapping of tensors\), got a "
                                        r"torch module \(LeNet\): " + HOW):
        parity.torch_to_flax("lenet", tmodel)
    path = tmp_path / "lenet.pt"
    torch.save(tmodel.state_dict(), path)
    for p in (path, str(path)):
        with pytest.raises(TypeError, match=rf"got a path \('{re.escape(str(path))}'\): " + HOW):
            parity.torch_to_flax("lenet", p)
    weights = parity.read_weights(path, "lenet")
    with pytest.raises(TypeError, match=r"got Weights \(its \.state_dict is one\): " + HOW):
        parity.torch_to_flax("lenet", weights)
    assert isinstance(parity.torch_to_flax("lenet", weights.state_dict), ImageClassifier)


def test_torch_to_flax_refuses_a_bad_name():
    state_dict = torch_ref.create("lenet").state_dict()
    with pytest.raises(TypeError, match=r"^net name must be a str, got None \(NoneType\); valid nets: "):
        parity.torch_to_flax(None, state_dict)
    with pytest.raises(flaxnets.UnknownNetError, match=r"^unknown net 'lenett'; valid nets: lenet, "):
        parity.torch_to_flax("lenett", state_dict)
