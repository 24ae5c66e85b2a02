"""A run resumed in the other framework, and a plain PyTorch checkpoint resumed in JAX.

``scripts/train.py --resume RUN --backend OTHER`` carries weights, BatchNorm statistics, the
optimizer state (Adam moments and step count, SGD momentum buffers), the schedule's position,
the epoch count and the metrics; ``--resume-from-torch CKPT`` starts a run where a plain
PyTorch loop's ``torch.save({'model', 'optimizer', 'epoch'})`` stopped. Both engines train the
same batches (``flaxnets.fit.epoch_permutation``), so a net without augmentation or dropout ends
where the same-framework resume ends, up to float rounding.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import torch_ref
from flaxnets import checkpoint
from flaxnets.data import load_idx_dir
from flaxnets.fit import checkpoint_paths, fit
from flaxnets.recipes import recipe_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_run import idx_dir, run_script, snapshot, train_script  # noqa: E402,F401
from test_run_faults import copy_run, one_error_line  # noqa: E402
from test_train import synthetic_rgb  # noqa: E402

OTHER = {"jax": "torch", "torch": "jax"}


def metrics(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv as numbers, without the timing columns."""
    return [{k: float(v) for k, v in r.items() if k not in ("images_per_s", "seconds")}
            for r in csv.DictReader(open(run_dir / "metrics.csv"))]


def config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def assert_same_training(a: list[dict[str, float]], b: list[dict[str, float]], loss_rtol: float,
                         acc_atol: float) -> None:
    """The same epochs and learning rates; losses within loss_rtol, accuracies within acc_atol."""
    assert [(r["epoch"], r["lr"]) for r in a] == [(r["epoch"], r["lr"]) for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if k.endswith("_loss"):
                assert rb[k] == pytest.approx(ra[k], rel=loss_rtol), (ra["epoch"], k)
            elif k.endswith("_acc"):
                assert abs(rb[k] - ra[k]) <= acc_atol, (ra["epoch"], k)


def torch_adam_steps(last_pt: Path) -> set[float]:
    sd = torch.load(last_pt, weights_only=True)["optimizer"]["state"]
    return {float(e["step"]) for e in sd.values()}


def jax_counts(last: Path) -> dict[str, int]:
    tree, _ = checkpoint.load(last)
    return {k: int(v) for k, v in checkpoint.flatten(tree["opt"]).items() if k.endswith("count")}


# --------------------------------------------------------------------------- real FashionMNIST
@pytest.mark.slow
@pytest.mark.parametrize("first", ["jax", "torch"])
def test_lenet_resumed_in_the_other_framework_ends_where_the_same_framework_ends(first, tmp_path,
                                                                                  monkeypatch):
    """LeNet, its recipe (Adam 1e-3, batch 256) on the real FashionMNIST: 1 epoch in ``first``,
    then 2 more in each framework. Measured (2-core CPU): JAX first, train loss 0.9409528 /
    0.9409524 and 0.7740043 / 0.7740049, test accuracy 0.7149 both; torch first, 0.9476347 /
    0.9476354 and 0.7583050 / 0.7583061, 0.7182 both. 5 minutes for both on a busy 2-core CPU."""
    monkeypatch.setenv("FLAXNETS_CACHE", str(tmp_path / "cache"))
    same, other = tmp_path / "same", tmp_path / "other"
    assert train_script.main(["--net", "lenet", "--backend", first, "--epochs", "1", "--out", str(same)]) == 0
    copy_run(same, other)
    assert train_script.main(["--resume", str(same), "--epochs", "3"]) == 0
    assert train_script.main(["--resume", str(other), "--epochs", "3", "--backend", OTHER[first]]) == 0

    a, b = metrics(same), metrics(other)
    assert a[0] == b[0]  # epoch 1, from the one checkpoint
    assert_same_training(a, b, loss_rtol=1e-4, acc_atol=0.002)
    ca, cb = config(same), config(other)
    assert abs(ca["test_acc"] - cb["test_acc"]) <= 0.002 and cb["test_acc"] > 0.65
    assert cb["backend"] == OTHER[first] and cb["resumed_from_epoch"] == 1
    assert [(s["from"], s["to"], s["after_epoch"]) for s in cb["backend_switches"]] == [(first, OTHER[first], 1)]
    steps = ca["steps_per_epoch"]
    assert steps == 235  # 60,000 / 256, the last batch partial
    last = checkpoint_paths(other, OTHER[first])["last"]
    if OTHER[first] == "torch":
        assert torch_adam_steps(last) == {3.0 * steps}
    else:
        assert set(jax_counts(last).values()) == {3 * steps}
    assert not any(p.exists() for p in checkpoint_paths(other, first).values())  # one format per run


# --------------------------------------------------------------------------- fit, state carried
def sgd_recipe():
    """The ResNets' SGD (momentum 0.9, weight decay 1e-4, lr ×0.1 at a milestone) on net_batchnorm
    without augmentation: a BatchNorm net whose numbers both frameworks can reproduce."""
    return dataclasses.replace(recipe_for("resnet20"), dataset="cifar2", batch_size=32, epochs=1,
                               milestones=(1,), lr=0.05, augment="none", normalize="unit")


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory) -> Path:
    """One epoch of net_batchnorm in JAX with the SGD-momentum recipe."""
    run = tmp_path_factory.mktemp("sgd") / "run"
    fit("net_batchnorm", synthetic_rgb(), sgd_recipe(), backend="jax", run_dir=run)
    return run


def test_the_whole_state_crosses_exactly_and_back(sgd_run, tmp_path):
    """JAX -> torch: the torch checkpoint holds the JAX weights, BatchNorm statistics (counter
    included) and momentum buffers exactly; torch -> JAX gives the JAX checkpoint bit for bit."""
    from parity.convert import to_numpy_state_dict
    from parity.optim import optimizer_state_to_torch, optimizer_tensors, param_names
    from parity.train_state import run_importer

    import flaxnets
    from flaxnets.engine import load_train_state, state_template
    run = copy_run(sgd_run, tmp_path / "run")
    recipe = sgd_recipe()
    fit("net_batchnorm", synthetic_rgb(), recipe, backend="torch", run_dir=run, resume=True,
        import_state=run_importer(run, "jax"))  # epochs=1: trains nothing, writes the torch checkpoint
    pt = torch.load(checkpoint_paths(run, "torch")["last"], weights_only=True)
    assert json.loads(pt["meta"])["epoch"] == 1 and json.loads(pt["meta"])["backend"] == "torch"

    model = flaxnets.create("net_batchnorm", num_classes=2)
    (params, rest), opt = load_train_state(checkpoint_paths(run, "jax")["last"], "net_batchnorm", 2,
                                           state_template(model, recipe, 8))[0]
    nnx.update(model, params, rest)
    want = to_numpy_state_dict(model)
    assert list(pt["model"]) == list(want)
    assert all(np.array_equal(pt["model"][k].numpy(), want[k]) for k in want)
    assert int(pt["model"]["conv1_batchnorm.num_batches_tracked"]) == 8  # 256 / 32 steps
    names = param_names(model)
    got, exp = (optimizer_tensors(sd, names) for sd in (pt["optimizer"], optimizer_state_to_torch(opt, model, recipe, 0.005)))
    assert len(got) == len(names) and all(k.endswith(".momentum_buffer") for k in got)
    assert all(np.array_equal(got[k], exp[k]) for k in exp) and any(np.abs(v).max() > 0 for v in got.values())
    assert pt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005)  # after the milestone

    back = tmp_path / "back"
    (back / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.pt", back / "checkpoints" / "last.pt")
    fit("net_batchnorm", synthetic_rgb(), recipe, backend="jax", run_dir=back, resume=True,
        import_state=run_importer(back, "torch"))
    a, _ = checkpoint.load(checkpoint_paths(run, "jax")["last"])
    b, meta = checkpoint.load(checkpoint_paths(back, "jax")["last"])
    fa, fb = checkpoint.flatten(a), checkpoint.flatten(b)
    rngs = [k for k in fa if "rngs" in k]  # none in this net: nothing but the state is compared
    assert not rngs and set(fa) == set(fb)
    assert all(fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)
    assert meta["backend"] == "jax" and meta["epoch"] == 1


def test_an_sgd_momentum_batchnorm_run_continues_in_torch_as_in_jax(sgd_run, tmp_path):
    """Epoch 2 after the milestone (lr 0.005) in torch and in JAX from the same JAX epoch 1."""
    from parity.train_state import run_importer

    recipe = dataclasses.replace(sgd_recipe(), epochs=2)
    same, other = copy_run(sgd_run, tmp_path / "same"), copy_run(sgd_run, tmp_path / "other")
    ra = fit("net_batchnorm", synthetic_rgb(), recipe, backend="jax", run_dir=same, resume=True)
    rb = fit("net_batchnorm", synthetic_rgb(), recipe, backend="torch", run_dir=other, resume=True,
             import_state=run_importer(other, "jax"))
    assert ra.metrics[0] == rb.metrics[0] and rb.info["resumed_from_epoch"] == 1
    assert ra.metrics[1]["lr"] == rb.metrics[1]["lr"] == pytest.approx(0.005)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in rows]  # noqa: E731
    assert_same_training(strip(ra.metrics), strip(rb.metrics), loss_rtol=1e-4, acc_atol=1 / 40)


# --------------------------------------------------------------------------- scripts/train.py
def lenet(idx_dir: Path, out: Path, backend: str, epochs: int) -> list[str]:
    return ["--net", "lenet", "--backend", backend, "--epochs", str(epochs), "--batch-size", "32",
            "--lr", "0.01", "--data-dir", str(idx_dir), "--out", str(out)]


@pytest.fixture(scope="module")
def jax_runs(idx_dir, tmp_path_factory) -> tuple[Path, Path]:
    """LeNet (Adam) on the small IDX set: 1 epoch in JAX, and the same run through 3 epochs."""
    d = tmp_path_factory.mktemp("lenet")
    assert train_script.main(lenet(idx_dir, d / "one", "jax", 1)) == 0
    assert train_script.main(lenet(idx_dir, d / "three", "jax", 3)) == 0
    return d / "one", d / "three"


def test_train_py_switches_a_run_and_back(jax_runs, tmp_path, capsys):
    one, three = jax_runs
    run = copy_run(one, tmp_path / "run")
    assert train_script.main(["--resume", str(run), "--epochs", "2", "--backend", "torch"]) == 0
    assert f"resuming {run} from {run / 'checkpoints' / 'last'}, carried from jax to torch" in capsys.readouterr().out
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt"}
    assert torch_adam_steps(run / "checkpoints" / "last.pt") == {20.0}  # 2 epochs × 10 steps
    assert train_script.main(["--resume", str(run), "--epochs", "3", "--backend", "jax"]) == 0
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last"}
    assert set(jax_counts(run / "checkpoints" / "last").values()) == {30}
    cfg = config(run)
    assert cfg["backend"] == "jax" and cfg["started"] == config(one)["started"]
    assert [(s["from"], s["to"], s["after_epoch"]) for s in cfg["backend_switches"]] == [
        ("jax", "torch", 1), ("torch", "jax", 2)]
    got, want = metrics(run), metrics(three)
    assert got[0] == want[0] and [r["epoch"] for r in got] == [1, 2, 3]  # metrics.csv continued
    assert_same_training(want, got, loss_rtol=1e-4, acc_atol=1 / 60)
    assert cfg["test_acc"] == pytest.approx(config(three)["test_acc"], abs=1 / 60)


def test_a_failed_switch_leaves_the_run_as_it_was(jax_runs, tmp_path, capsys):
    one, _ = jax_runs
    run = copy_run(one, tmp_path / "run")
    data = max((p for p in (run / "checkpoints" / "last").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    before = snapshot(run)
    assert train_script.main(["--resume", str(run), "--epochs", "2", "--backend", "torch"]) == 1
    assert "is corrupt or truncated" in one_error_line(capsys.readouterr().err)
    assert snapshot(run) == before
    run = copy_run(one, tmp_path / "run2")
    before = snapshot(run)
    assert train_script.main(["--resume", str(run), "--epochs", "2", "--backend", "torch", "--lr", "0.1"]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        "error: --lr 0.1 differs from the run being resumed (0.01); a resumed run keeps its settings")
    assert snapshot(run) == before


# --------------------------------------------------------------------------- plain PyTorch checkpoints
def plain_torch_training(idx_dir: Path, path: Path, epochs: int, opt_kind: str = "adam",
                         **save: object) -> Path:
    """What a plain PyTorch script does: train ``epochs`` epochs of batch 32, then
    ``torch.save({'model': ..., 'optimizer': ..., 'epoch': epochs})`` (``save`` overrides keys)."""
    ds = load_idx_dir(idx_dir)
    torch.manual_seed(0)
    model = torch_ref.create("lenet")
    opt = (torch.optim.Adam(model.parameters(), lr=0.01) if opt_kind == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.01))
    x = torch.from_numpy(ds.x_train.copy()).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(ds.y_train.astype(np.int64))
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epochs, **save}
    torch.save({k: v for k, v in ckpt.items() if v is not None}, path)
    return path


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_plain_pytorch_checkpoint_resumes(backend, idx_dir, tmp_path, capsys):
    from parity.convert import to_numpy_state_dict, torch_to_flax
    from parity.optim import optimizer_tensors

    ckpt = plain_torch_training(idx_dir, tmp_path / "ckpt.pt", epochs=2)
    saved = torch.load(ckpt, weights_only=True)
    run = tmp_path / "run"
    args = [*lenet(idx_dir, run, backend, 2), "--resume-from-torch", str(ckpt)]
    assert train_script.main(args) == 0  # at the epochs done: trains nothing, writes the run
    cfg = config(run)
    assert cfg["resumed_from_torch"]["after_epoch"] == 2 and cfg["resumed_from_torch"]["file"] == str(ckpt)
    last = checkpoint_paths(run, backend)["last"]
    if backend == "jax":
        tree, meta = checkpoint.load(last)
        assert set(jax_counts(last).values()) == {20}  # Adam's step count: 2 epochs × 10 steps
        fmodel = torch_to_flax("lenet", saved["model"])
        assert all(np.array_equal(to_numpy_state_dict(fmodel)[k], saved["model"][k].numpy())
                   for k in saved["model"])
        mu = checkpoint.flatten(tree["opt"])["0/mu/conv/0/kernel"]
        np.testing.assert_array_equal(mu, saved["optimizer"]["state"][0]["exp_avg"].numpy().transpose(2, 3, 1, 0))
    else:
        pt = torch.load(last, weights_only=True)
        names = [n for n, _ in torch_ref.create("lenet").named_parameters()]
        a, b = optimizer_tensors(pt["optimizer"], names), optimizer_tensors(saved["optimizer"], names)
        assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
        meta = json.loads(pt["meta"])
    assert meta["epoch"] == 2 and meta["metrics"] == []
    assert train_script.main(["--resume", str(run), "--epochs", "3"]) == 0
    assert [r["epoch"] for r in metrics(run)] == [3.0]
    if backend == "jax":
        assert set(jax_counts(last).values()) == {30}
    else:
        assert torch_adam_steps(last) == {30.0}
    assert config(run)["resumed_from_torch"]["after_epoch"] == 2  # kept by later resumes


BAD = {  # case: (what the checkpoint holds, the error line's start)
    "another net": ({}, "error: {ckpt}: state_dict does not match the net: "),
    "another optimizer": ({"opt_kind": "sgd"}, "error: {ckpt}: the optimizer state comes from SGD "
                          "without momentum; the recipe trains with Adam (lr 0.01)"),
    "no optimizer": ({"optimizer": None}, "error: {ckpt} holds no optimizer state (looked for "),
    "no epoch": ({"epoch": None}, "error: {ckpt} has no 'epoch' (the epochs done, an integer >= 0): found None"),
    "epoch counted from 0": ({"epoch": 1}, "error: {ckpt}: the Adam step count is 20, not the 10 steps "
                             "given (1 epochs done × 10 steps per epoch at batch size 32: "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_plain_checkpoint_that_does_not_fit_is_one_line_and_leaves_nothing(case, idx_dir, tmp_path, capsys):
    kw, want = BAD[case]
    ckpt = tmp_path / "ckpt.pt"
    if case == "another net":
        model = torch_ref.create("net_width")
        torch.save({"model": model.state_dict(), "optimizer": torch.optim.Adam(model.parameters()).state_dict(),
                    "epoch": 1}, ckpt)
    else:
        plain_torch_training(idx_dir, ckpt, epochs=2, **kw)
    run = tmp_path / "run"
    assert train_script.main([*lenet(idx_dir, run, "jax", 3), "--resume-from-torch", str(ckpt)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(want.format(ckpt=ckpt)), line
    assert not run.exists()  # nothing written, the directory it would have made removed


def test_resume_from_torch_usage(idx_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_script.main(["--resume", str(tmp_path), "--resume-from-torch", "x.pt"])
    assert e.value.code == 2 and "--resume-from-torch starts one" in capsys.readouterr().err
    assert train_script.main([*lenet(idx_dir, tmp_path / "run", "jax", 1), "--resume-from-torch",
                              str(tmp_path / "none.pt")]) == 1
    assert one_error_line(capsys.readouterr().err) == f"error: --resume-from-torch {tmp_path / 'none.pt'}: no such file"


def test_resume_from_torch_with_force_replaces_a_run(jax_runs, idx_dir, tmp_path):
    """Over a JAX run with --force, in torch: the run's files go, the imported checkpoint stays."""
    one, _ = jax_runs
    run = copy_run(one, tmp_path / "run")
    ckpt = plain_torch_training(idx_dir, tmp_path / "ckpt.pt", epochs=1)
    args = [*lenet(idx_dir, run, "torch", 2), "--resume-from-torch", str(ckpt)]
    assert train_script.main(args) == 1  # holds a run
    assert train_script.main([*args, "--force"]) == 0
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt"}
    assert [r["epoch"] for r in metrics(run)] == [2.0] and config(run)["backend"] == "torch"
    assert torch_adam_steps(run / "checkpoints" / "last.pt") == {20.0}


def test_convert_help_says_how_a_training_state_is_carried(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import convert as convert_script  # scripts/convert.py

    with pytest.raises(SystemExit):
        convert_script.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--resume RUN --backend jax|torch continues a run in the other framework" in out
    assert "--resume-from-torch CKPT" in out


def test_a_validating_run_carries_its_best_state(idx_dir, tmp_path):
    """dilated keeps its best-validation weights: the switch writes the best state in the other
    format too, the very weights of the JAX best checkpoint, and the resumed run ends on them."""
    from parity.train_state import run_importer

    ds = load_idx_dir(idx_dir)
    recipe = recipe_for("dilated", epochs=3, batch_size=32, lr=3e-3)
    run = tmp_path / "run"
    fit("dilated", ds, recipe, backend="jax", run_dir=run)
    jax_best = checkpoint.load(checkpoint_paths(run, "jax")["best"])
    result = fit("dilated", ds, recipe, backend="torch", run_dir=run, resume=True,
                 import_state=run_importer(run, "jax"))  # 3 epochs done: trains nothing
    best = torch.load(checkpoint_paths(run, "torch")["best"], weights_only=True)
    assert json.loads(best["meta"])["epoch"] == jax_best[1]["epoch"] == result.info["best_epoch"]
    kernel = checkpoint.flatten(jax_best[0]["model"])["conv1/0/kernel"]
    np.testing.assert_array_equal(best["model"]["conv1.0.weight"].numpy(), kernel.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(result.model.state_dict()["conv1.0.weight"].numpy(),
                                  best["model"]["conv1.0.weight"].numpy())  # the kept weights
