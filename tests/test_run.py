"""What scripts/train.py leaves behind, resuming after Ctrl-C or a kill, and failing cleanly."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxnets import checkpoint
from flaxnets.data import write_idx
from flaxnets.fit import checkpoint_paths, has_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train as train_script  # noqa: E402  (scripts/train.py)
from test_train import synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("images_per_s", "seconds")  # the only columns allowed to differ between runs


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    """A small FashionMNIST-shaped IDX directory (10 classes, 320 train, 60 test images)."""
    ds = synthetic(n_train=320, n_test=60, classes=10, seed=3)
    d = tmp_path_factory.mktemp("idx")
    for split, x, y in (("train", ds.x_train, ds.y_train), ("t10k", ds.x_test, ds.y_test)):
        write_idx(d / f"{split}-images-idx3-ubyte.gz", x[..., 0])
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    return d


def base_args(idx_dir: Path, out: Path, backend: str, epochs: int = 3) -> list[str]:
    return ["--net", "dilated", "--backend", backend, "--epochs", str(epochs), "--batch-size", "32",
            "--lr", "0.003", "--data-dir", str(idx_dir), "--out", str(out)]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory but its lock, by relative path: to prove nothing changed."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without the timing columns."""
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in csv.DictReader(open(run_dir / "metrics.csv"))]


@pytest.fixture(scope="module", params=["jax", "torch"])
def full_run(request, idx_dir, tmp_path_factory) -> tuple[str, Path]:
    """One uninterrupted 3-epoch run of dilated (it validates: best and last checkpoints) per backend."""
    out = tmp_path_factory.mktemp(f"full-{request.param}") / "run"
    assert train_script.main(base_args(idx_dir, out, request.param)) == 0
    return request.param, out


def run_script(code: str, args: list[str], env_extra: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """Run scripts/train.py with ``args`` in a fresh interpreter after executing ``code``."""
    # default_int_handler: pytest-xdist workers ignore SIGINT and children inherit that, so
    # without it Python would not turn Ctrl-C into KeyboardInterrupt as it does in a terminal
    launcher = ("import os, signal, sys, runpy\n"
                "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                f"{code}\n"
                f"sys.argv = ['scripts/train.py', *sys.argv[1:]]\n"
                f"runpy.run_path('scripts/train.py', run_name='__main__')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", launcher, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_run_dir_holds_every_artefact(full_run):
    backend, out = full_run
    names = {p.name for p in out.iterdir()}
    assert names >= {"config.json", "metrics.csv", "curves.png", "confusion_matrix.png",
                     "per_class.csv", "samples.png", "model.pt", "model.safetensors", "checkpoints"}
    suffix = "" if backend == "jax" else ".pt"  # JAX: orbax checkpoint directories
    assert {p.name for p in (out / "checkpoints").iterdir()} == {f"last{suffix}", f"best{suffix}"}
    cfg = json.loads((out / "config.json").read_text())
    if backend == "jax":
        assert checkpoint.steps(out / "checkpoints" / "last") == [3]
        assert checkpoint.steps(out / "checkpoints" / "best") == [cfg["best_epoch"]]
    assert cfg["backend"] == backend and cfg["recipe"]["epochs"] == 3 and cfg["seed"] == 0
    assert cfg["versions"]["jax"] and cfg["versions"]["torch"]
    r = rows(out)
    assert [x["epoch"] for x in r] == ["1", "2", "3"]
    best = max(range(3), key=lambda i: (float(r[i]["val_acc"]), -i))  # first best epoch is kept
    assert cfg["best_epoch"] == best + 1
    assert float(r[best]["test_acc"]) == pytest.approx(cfg["test_acc"])
    assert cfg["test_acc"] > 0.3  # learns the quadrant blocks; chance is 0.1
    per = list(csv.DictReader(open(out / "per_class.csv")))
    assert len(per) == 10 and sum(int(p["support"]) for p in per) == 60
    assert sum(int(p["correct"]) for p in per) == round(cfg["test_acc"] * 60)
    for png in ("curves.png", "confusion_matrix.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_pt_loads_strictly_into_torch_ref(full_run, idx_dir):
    import torch

    import torch_ref
    from flaxnets.data import load_idx_dir

    backend, out = full_run
    sd = torch.load(out / "model.pt", weights_only=True)
    assert list(sd) == list(torch_ref.create("dilated").state_dict())  # torch's own key order
    model = torch_ref.create("dilated")
    model.load_state_dict(sd, strict=True)
    model.eval()
    ds = load_idx_dir(idx_dir)
    x = torch.from_numpy(ds.x_test).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        acc = float((model(x).argmax(1).numpy() == ds.y_test).mean())
    cfg = json.loads((out / "config.json").read_text())
    assert acc == pytest.approx(cfg["test_acc"], abs=1 / 60)  # same predictions up to one image


@pytest.mark.slow
def test_kill_during_checkpoint_write_then_resume_is_bit_exact(full_run, idx_dir, tmp_path):
    """SIGKILL while the second 'last' checkpoint is half written; resume; same metrics.

    torch: the temporary file cut to half at its fsync. JAX (orbax): the arrays of step 2 written
    and their largest file cut to half, just before orbax renames the item into place."""
    backend = full_run[0]
    out = tmp_path / "run"
    if backend == "jax":
        kill = ("import pathlib\n"
                "real = os.rename\n"
                "def rename(src, dst):\n"
                "    if src.endswith('/checkpoints/last/2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp'):\n"
                "        big = max((p for p in pathlib.Path(src).rglob('*') if p.is_file()),\n"
                "                  key=lambda p: p.stat().st_size)\n"
                "        os.truncate(big, big.stat().st_size // 2)\n"
                "        os.kill(os.getpid(), signal.SIGKILL)\n"
                "    return real(src, dst)\n"
                "os.rename = rename\n")
    else:
        kill = ("real = os.fsync\n"
                "seen = [0]\n"
                "def fsync(fd):\n"
                "    path = os.readlink(f'/proc/self/fd/{fd}')\n"
                "    if '.last.' in path and path.endswith('.tmp'):\n"
                "        seen[0] += 1\n"
                "        if seen[0] == 2:\n"
                "            os.ftruncate(fd, os.fstat(fd).st_size // 2)\n"
                "            os.kill(os.getpid(), signal.SIGKILL)\n"
                "    return real(fd)\n"
                "os.fsync = fsync\n")
    p = run_script(kill, base_args(idx_dir, out, backend))
    assert p.returncode == -9, p.stderr[-2000:]
    ckdir = out / "checkpoints"
    leftovers = (lambda: [t.name for t in ckdir.glob("last/*.orbax-checkpoint-tmp")]) if backend == "jax" \
        else (lambda: [t.name for t in ckdir.glob(".*.tmp")])
    assert leftovers(), "the half-written checkpoint is left"
    assert len(rows(out)) == 1  # epoch 2 trained but was not saved: metrics.csv follows the checkpoint
    if backend == "jax":
        assert checkpoint.read_meta(ckdir / "last")[1]["epoch"] == 1  # the old step is intact
    assert train_script.main(["--resume", str(out)]) == 0
    assert rows(out) == rows(full_run[1])
    assert not leftovers()
    full = json.loads((full_run[1] / "config.json").read_text())
    resumed = json.loads((out / "config.json").read_text())
    assert resumed["test_acc"] == full["test_acc"] and resumed["resumed_from_epoch"] == 1


def test_stop_between_the_last_and_best_saves_then_resume_is_bit_exact(full_run, idx_dir, tmp_path,
                                                                        monkeypatch):
    """Stopped after epoch 1's 'last' checkpoint, before its 'best' one: the resume takes the best
    state from 'last', writes 'best' again, and ends as the uninterrupted run."""
    from flaxnets.engine import JaxEngine
    from torch_ref.engine import TorchEngine

    backend, full = full_run
    engine_cls = JaxEngine if backend == "jax" else TorchEngine
    orig = engine_cls.save_state

    def save_state(self, snapshot, path, meta):
        if path.name.startswith("best") and meta["epoch"] == 1:
            raise KeyboardInterrupt
        return orig(self, snapshot, path, meta)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(engine_cls, "save_state", save_state)
        assert train_script.main(base_args(idx_dir, out, backend)) == 130
    best = checkpoint_paths(out, backend)["best"]
    # epoch 1 is always the first best; its row is written after both saves
    assert not has_checkpoint(best, backend) and not (out / "metrics.csv").exists()
    assert train_script.main(["--resume", str(out)]) == 0
    assert rows(out) == rows(full)
    cfg, want = (json.loads((d / "config.json").read_text()) for d in (out, full))
    assert cfg["test_acc"] == want["test_acc"]
    if backend == "jax":
        assert checkpoint.read_meta(best)[1]["epoch"] == want["best_epoch"]


@pytest.mark.slow
def test_a_second_run_loads_every_executable_from_the_compile_cache(idx_dir, tmp_path):
    """Two runs sharing FLAXNETS_COMPILE_CACHE: the second compiles nothing, with equal metrics;
    ``off`` asks no cache at all."""
    count = ("import atexit, collections, jax\n"
             "seen = collections.Counter()\n"
             "jax.monitoring.register_event_listener(lambda event, **kw: seen.update([event]))\n"
             "atexit.register(lambda: print('cache', seen['/jax/compilation_cache/cache_hits'], "
             "seen['/jax/compilation_cache/cache_misses']))\n")
    cache = tmp_path / "xla"
    got = {}
    for name, setting in (("cold", cache), ("warm", cache), ("off", "off")):
        out = tmp_path / name
        p = run_script(count, base_args(idx_dir, out, "jax", epochs=1),
                       {"FLAXNETS_COMPILE_CACHE": str(setting)})
        assert p.returncode == 0, p.stderr[-2000:]
        hits, misses = (int(v) for v in p.stdout.rsplit("cache ", 1)[1].split())
        got[name] = hits, misses, rows(out), json.loads((out / "config.json").read_text())
    assert got["cold"][0] == 0 and got["cold"][1] > 0  # model creation alone compiles many
    assert got["warm"][:2] == (got["cold"][1], 0)
    assert got["off"][:2] == (0, 0)
    assert got["cold"][2] == got["warm"][2] == got["off"][2]  # the same numbers, loaded or compiled
    assert [got[n][3]["compile_cache"] for n in got] == [str(cache), str(cache), None]
    assert len(list(cache.glob("*-cache"))) == got["cold"][1]


def test_an_unwritable_compile_cache_is_one_warning_and_no_cache(tmp_path, monkeypatch, capsys):
    from flaxnets.compile_cache import enable_compile_cache

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FLAXNETS_COMPILE_CACHE", str(blocker / "xla"))
    assert enable_compile_cache() is None
    assert f"warning: no compilation cache, {blocker / 'xla'} is not writable" in capsys.readouterr().err


def test_ctrl_c_then_resume_is_bit_exact(full_run, idx_dir, tmp_path):
    """A real SIGINT during epoch 2: exit 130 with the resume command; resuming matches."""
    backend, full = full_run
    out = tmp_path / "run"
    engine = ("from flaxnets.engine import JaxEngine as E" if backend == "jax"
              else "from torch_ref.engine import TorchEngine as E")
    interrupt = (f"{engine}\n"
                 "orig = E.train_epoch\n"
                 "def train_epoch(self, epoch, progress=None):\n"
                 "    if epoch == 1:\n"
                 "        os.kill(os.getpid(), signal.SIGINT)\n"
                 "    return orig(self, epoch, progress)\n"
                 "E.train_epoch = train_epoch\n")
    p = run_script(interrupt, base_args(idx_dir, out, backend))
    assert p.returncode == 130, p.stderr[-2000:]
    assert f"continue with: python scripts/train.py --resume {out}" in p.stderr
    assert "Traceback" not in p.stderr
    assert len(rows(out)) == 1
    assert train_script.main(["--resume", str(out)]) == 0
    assert rows(out) == rows(full)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(backend, idx_dir, tmp_path,
                                                                  monkeypatch, capsys):
    """Weights poisoned with NaN before epoch 2: the run stops naming the step; epoch 1 is kept."""
    import jax
    import jax.numpy as jnp
    import torch

    from flaxnets.engine import JaxEngine
    from torch_ref.engine import TorchEngine

    engine_cls = JaxEngine if backend == "jax" else TorchEngine
    orig = engine_cls.train_epoch

    def poisoned(self, epoch, progress=None):
        if epoch == 1:
            if backend == "jax":
                params, rest = self.state
                self.state = (jax.tree.map(lambda a: a * jnp.nan, params), rest)
            else:
                with torch.no_grad():
                    next(self.model.parameters()).fill_(float("nan"))
        return orig(self, epoch, progress)

    monkeypatch.setattr(engine_cls, "train_epoch", poisoned)
    out = tmp_path / "run"
    assert train_script.main(base_args(idx_dir, out, backend)) == 1
    err = capsys.readouterr().err.strip()
    suffix = "" if backend == "jax" else ".pt"
    assert err == (f"error: the training loss became nan at step 9 (epoch 2, step 1 of the epoch); "
                   f"stopped, the last good checkpoint is {out / 'checkpoints' / ('last' + suffix)}")
    assert len(rows(out)) == 1
    if backend == "jax":
        tree, meta = checkpoint.load(out / "checkpoints" / "last")
        assert meta["epoch"] == 1
        assert all(np.isfinite(v).all() for v in checkpoint.flatten(tree["model"]).values())


def test_resume_refuses_changed_settings_and_corrupt_checkpoints(full_run, tmp_path, capsys):
    backend, full = full_run
    assert train_script.main(["--resume", str(full), "--net", "lenet"]) == 1
    assert "--net lenet differs from the run being resumed (dilated)" in capsys.readouterr().err
    assert train_script.main(["--resume", str(full), "--precision", "bf16"]) == 1
    assert "--precision bf16 differs from the run being resumed (fp32)" in capsys.readouterr().err
    assert train_script.main(["--resume", str(tmp_path)]) == 1
    assert "no readable config.json" in capsys.readouterr().err
    if backend == "jax":  # a truncated array file: one line naming the step directory
        run = tmp_path / "copy"
        shutil.copytree(full, run)
        step = run / "checkpoints" / "last" / "3"
        data = max((p for p in (step / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        before = snapshot(run)
        assert train_script.main(["--resume", str(run), "--epochs", "4"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {step} is corrupt or truncated (")
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert snapshot(run) == before  # the failed resume changed nothing, config.json included


def test_unwritable_out_and_full_disk_fail_before_training(idx_dir, tmp_path, monkeypatch, capsys):
    import flaxnets.fit

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(flaxnets.fit, "fit", no_training)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert train_script.main(base_args(idx_dir, blocker / "run", "jax")) == 1
    assert capsys.readouterr().err.startswith(f"error: cannot write to --out {blocker / 'run'}")

    class Usage:
        free = 10 << 20

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage)
    assert train_script.main(base_args(idx_dir, tmp_path / "run", "jax")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: not enough disk space") and "10 MiB free" in err


def test_bad_command_lines(capsys):
    assert train_script.main(["--net", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown net 'nope'; valid nets: lenet, dilated")
    with pytest.raises(SystemExit) as e:
        train_script.main(["--net", "lenet", "--epochs", "0"])
    assert e.value.code == 2 and "--epochs must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_script.main([])
    assert "--net is required" in capsys.readouterr().err


# --------------------------------------------------------------------------- scripts/evaluate.py
sys.path.insert(0, str(ROOT / "scripts"))
import evaluate as evaluate_script  # noqa: E402  (scripts/evaluate.py)


def test_evaluate_other_backend_reports_the_runs_accuracy(full_run, idx_dir, tmp_path, capsys):
    """Weights trained in one framework, evaluated in the other, from every file the run left."""
    backend, out = full_run
    other = "torch" if backend == "jax" else "jax"
    test_acc = json.loads((out / "config.json").read_text())["test_acc"]
    # evaluate reads torch-layout files: a torch run's checkpoints too, not JAX's orbax directories
    extra = [out / "checkpoints" / "best.pt"] if backend == "torch" else []
    for weights in (out, out / "model.pt", out / "model.safetensors", *extra):
        rc = evaluate_script.main(["--net", "dilated", "--weights", str(weights), "--backend", other,
                                   "--data-dir", str(idx_dir), "--out", str(tmp_path / "ev")])
        text = capsys.readouterr().out
        assert rc == 0
        acc = float(text.split("test accuracy ")[1].split(",")[0])
        assert acc == pytest.approx(test_acc, abs=1e-3), weights
        assert "class:T-shirt/top, total num:" in text  # the per-class table
    assert {p.name for p in (tmp_path / "ev").iterdir()} == {"confusion_matrix.png", "per_class.csv",
                                                           "samples.png"}


def test_evaluate_on_an_image_folder(full_run, tmp_path, capsys):
    """Gray PNGs at twice the size are resized to 28x28; channels and class count must match."""
    from PIL import Image

    _, out = full_run
    ds = synthetic(n_train=200, n_test=0, classes=10, seed=5)
    for c in range(10):
        for i in np.flatnonzero(ds.y_train == c)[:2]:
            d = tmp_path / "folder" / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.x_train[i, :, :, 0]).resize((56, 56)).save(d / f"{i}.png")
    args = ["--net", "dilated", "--weights", str(out / "model.pt"), "--out", str(tmp_path / "ev")]
    assert evaluate_script.main([*args, "--data-dir", str(tmp_path / "folder")]) == 0
    assert "(all images), 20 images" in capsys.readouterr().out
    for c in range(3, 10):
        shutil.rmtree(tmp_path / "folder" / f"class{c}")
    assert evaluate_script.main([*args, "--data-dir", str(tmp_path / "folder")]) == 1
    assert "the weights have 10 classes but the data has 3" in capsys.readouterr().err
    Image.new("RGB", (28, 28)).save(tmp_path / "folder" / "class0" / "rgb.png")
    assert evaluate_script.main([*args, "--data-dir", str(tmp_path / "folder")]) == 1
    assert "rgb.png: image has mode 'RGB', expected a 1-channel" in capsys.readouterr().err


def test_evaluate_refuses_bad_weights(full_run, idx_dir, tmp_path, capsys):
    import pickle

    _, out = full_run
    common = ["--data-dir", str(idx_dir), "--out", str(tmp_path / "ev")]

    def run(net, weights, *extra):
        rc = evaluate_script.main(["--net", net, "--weights", str(weights), *common, *extra])
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return rc, err

    rc, err = run("lenet", out / "model.pt")  # another net's weights
    assert rc == 1 and "does not hold 'lenet' weights" in err and "missing conv.0.weight" in err
    rc, err = run("lenet", out)
    assert rc == 1 and "is a run of 'dilated', not 'lenet'" in err
    for name in ("model.pt", "model.safetensors"):
        cut = tmp_path / name
        cut.write_bytes((out / name).read_bytes()[:5000])  # truncated
        rc, err = run("dilated", cut)
        assert rc == 1 and str(cut) in err
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"conv1.0.weight": Evil()}))
    rc, err = run("dilated", evil)
    assert rc == 1 and not marker.exists()
    rc, err = run("dilated", out, "--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0.2", "0.2")
    assert rc == 1 and "--mean needs 1 values for 'dilated', got 3" in err
    assert evaluate_script.main(["--net", "nope", "--weights", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown net 'nope'; valid nets:")


def test_training_refuses_images_of_the_wrong_size(tmp_path, capsys):
    ds = synthetic(n_train=64, n_test=8, classes=10)
    d = tmp_path / "idx"
    d.mkdir()
    big = np.pad(ds.x_train[..., 0], ((0, 0), (2, 2), (2, 2)))
    write_idx(d / "train-images-idx3-ubyte.gz", big)
    write_idx(d / "train-labels-idx1-ubyte.gz", ds.y_train)
    write_idx(d / "t10k-images-idx3-ubyte.gz", np.pad(ds.x_test[..., 0], ((0, 0), (2, 2), (2, 2))))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", ds.y_test)
    assert train_script.main(["--net", "lenet", "--epochs", "1", "--data-dir", str(d),
                              "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == ("error: net 'lenet' takes 28x28 images, the data has 32x32 "
                                       "(resize the data or pick a net made for that size)\n")


@pytest.mark.slow
def test_two_processes_with_jax_distributed_match_one(idx_dir, tmp_path):
    """--distributed on two local processes (one CPU device each, gloo): the 1-process metrics."""
    import socket

    full = tmp_path / "one"
    assert train_script.main(base_args(idx_dir, full, "jax", epochs=2)) == 0
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    procs = [subprocess.Popen(
        [sys.executable, "scripts/train.py", *base_args(idx_dir, out, "jax", epochs=2), "--distributed"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "process 1 of 2, 1 local / 2 global devices" in logs[1]
    assert "process 0 writes" in logs[1] and "run written to" in logs[0]
    two, one = rows(out), rows(full)
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one]
    for a, b in zip(two, one):  # batch halves on two devices: sums reassociate, hence approx
        assert {k: pytest.approx(float(v), rel=1e-4, abs=1e-6) for k, v in a.items()} == \
            {k: float(v) for k, v in b.items()}
