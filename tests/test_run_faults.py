"""scripts/train.py never loses or damages a run: interrupted starts, occupied --out, failed
resumes, shortened --epochs, two processes on one run directory, impossible batch sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import filelock
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_run import ROOT, idx_dir, rows, run_script, snapshot, train_script  # noqa: E402,F401


def lenet_args(idx_dir: Path, out: Path, epochs: int = 1, backend: str = "jax") -> list[str]:
    return ["--net", "lenet", "--backend", backend, "--epochs", str(epochs), "--batch-size", "32",
            "--data-dir", str(idx_dir), "--out", str(out)]


def one_error_line(err: str) -> str:
    """The single line a refused command printed on stderr (asserting there was only one)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(idx_dir, tmp_path_factory) -> Path:
    """A finished 2-epoch LeNet run (JAX)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_script.main(lenet_args(idx_dir, out, epochs=2)) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_ctrl_c_before_the_first_epoch_ends_then_resume_trains_from_the_start(idx_dir, finished,
                                                                              tmp_path):
    """SIGINT in epoch 1: the printed --resume command works and gives the uninterrupted run."""
    out = tmp_path / "run"
    interrupt = ("from flaxnets.engine import JaxEngine as E\n"
                 "orig = E.train_epoch\n"
                 "def train_epoch(self, epoch, progress=None):\n"
                 "    os.kill(os.getpid(), signal.SIGINT)\n"
                 "    return orig(self, epoch, progress)\n"
                 "E.train_epoch = train_epoch\n")
    p = run_script(interrupt, lenet_args(idx_dir, out, epochs=2))
    assert p.returncode == 130, p.stderr[-2000:]
    hint = p.stderr.strip().splitlines()[-1]
    assert hint == ("interrupted before the first epoch ended, so no epoch was saved; start it "
                    f"again with: python scripts/train.py --resume {out}")
    assert "Traceback" not in p.stderr
    assert not (out / "metrics.csv").exists() and (out / "config.json").is_file()
    p = subprocess.run([sys.executable, "scripts/train.py", "--resume", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"{out} stopped before its first epoch ended; training it from the start" in p.stdout
    assert rows(out) == rows(finished)


def test_ctrl_c_before_training_starts_leaves_no_directory(idx_dir, tmp_path, monkeypatch, capsys):
    import flaxnets.data

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(flaxnets.data, "load_dataset", interrupted)
    out = tmp_path / "new" / "run"
    assert train_script.main(lenet_args(idx_dir, out)) == 130
    assert capsys.readouterr().err.strip() == "interrupted before training started; nothing was written"
    assert not out.exists()


def test_nan_before_the_first_epoch_ends_says_nothing_was_saved(idx_dir, tmp_path, monkeypatch,
                                                                capsys):
    import jax
    import jax.numpy as jnp

    from flaxnets.engine import JaxEngine

    orig = JaxEngine.train_epoch

    def poisoned(self, epoch, progress=None):
        params, rest = self.state
        self.state = (jax.tree.map(lambda a: a * jnp.nan, params), rest)
        return orig(self, epoch, progress)

    monkeypatch.setattr(JaxEngine, "train_epoch", poisoned)
    out = tmp_path / "run"
    assert train_script.main(lenet_args(idx_dir, out)) == 1
    assert one_error_line(capsys.readouterr().err) == (
        "error: the training loss became nan at step 1 (epoch 1, step 1 of the epoch); stopped "
        "before the first epoch ended, so nothing was saved")


def test_out_holding_a_run_is_refused_and_force_replaces_it(idx_dir, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    assert train_script.main(lenet_args(idx_dir, run)) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: --out {run} already holds a run (config.json, metrics.csv, …); continue it with "
        f"--resume {run}, or pass --force to replace it")
    assert snapshot(run) == before
    assert train_script.main([*lenet_args(idx_dir, run), "--force"]) == 0
    assert [r["epoch"] for r in rows(run)] == ["1"]
    assert json.loads((run / "config.json").read_text())["recipe"]["epochs"] == 1
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_force_keeps_the_old_run_when_the_new_one_fails_to_start(idx_dir, finished, tmp_path,
                                                                 capsys):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    args = lenet_args(idx_dir, run)
    args[args.index("--data-dir") + 1] = str(tmp_path / "no-such-dir")
    assert train_script.main([*args, "--force"]) == 1
    one_error_line(capsys.readouterr().err)
    assert snapshot(run) == before


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_failed_resumes_leave_the_run_exactly_as_it_was(idx_dir, tmp_path, backend, capsys):
    """A corrupt last checkpoint, and --epochs below the epochs done: refused, nothing rewritten."""
    run = tmp_path / "run"
    assert train_script.main(lenet_args(idx_dir, run, epochs=2, backend=backend)) == 0
    capsys.readouterr()
    before = snapshot(run)
    assert train_script.main(["--resume", str(run), "--epochs", "1"]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        "error: cannot resume: the run has trained 2 epochs, more than the 1 asked for; "
        "ask for 2 or more")
    assert snapshot(run) == before
    if backend == "torch":
        last = run / "checkpoints" / "last.pt"
    else:
        last = max((p for p in (run / "checkpoints" / "last").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = snapshot(run)
    assert train_script.main(["--resume", str(run), "--epochs", "3"]) == 1
    one_error_line(capsys.readouterr().err)
    assert snapshot(run) == before


def test_resume_to_the_epochs_already_done_finishes_the_record(idx_dir, finished, tmp_path):
    """A run killed after its last checkpoint but before its files: resuming writes them."""
    run = copy_run(finished, tmp_path / "run")
    for name in ("model.pt", "model.safetensors", "curves.png"):
        (run / name).unlink()
    assert train_script.main(["--resume", str(run)]) == 0
    assert (run / "model.pt").is_file() and (run / "curves.png").is_file()
    assert rows(run) == rows(finished)
    cfg, old = (json.loads((d / "config.json").read_text()) for d in (run, finished))
    assert cfg["started"] == old["started"] and "resumed" in cfg


def test_a_resumed_run_keeps_its_earlier_epochs_in_metrics_csv_while_it_trains(idx_dir, finished,
                                                                               tmp_path):
    run = copy_run(finished, tmp_path / "run")
    interrupt = ("from flaxnets.engine import JaxEngine as E\n"
                 "orig = E.train_epoch\n"
                 "def train_epoch(self, epoch, progress=None):\n"
                 "    if epoch == 3:\n"
                 "        os.kill(os.getpid(), signal.SIGINT)\n"
                 "    return orig(self, epoch, progress)\n"
                 "E.train_epoch = train_epoch\n")
    p = run_script(interrupt, ["--resume", str(run), "--epochs", "4"])
    assert p.returncode == 130, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"interrupted; continue with: python scripts/train.py --resume {run}")
    assert [r["epoch"] for r in rows(run)] == ["1", "2", "3"]
    assert rows(run)[:2] == rows(finished)


def test_a_second_process_on_a_run_directory_is_refused_until_the_first_dies(idx_dir, tmp_path,
                                                                            capsys):
    """The lock is an flock: refused while its holder lives, free once it is killed (no stale lock)."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time\n"
         f"lock = filelock.FileLock({str(run / '.lock')!r})\nlock.acquire()\n"
         "print('held', flush=True)\ntime.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train_script.main(lenet_args(idx_dir, run)) == 1
        assert one_error_line(capsys.readouterr().err) == (
            f"error: {run} is in use: another process is training into it (it holds "
            f"{run / '.lock'}); wait for it to end")
        assert os.listdir(run) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert train_script.main(lenet_args(idx_dir, run)) == 0
    with filelock.FileLock(run / ".lock", timeout=0):  # released when the run ended
        pass


def test_an_impossible_batch_size_is_refused_before_anything_is_allocated(idx_dir, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    args = lenet_args(idx_dir, out)
    args[args.index("--batch-size") + 1] = "1000000000"
    assert train_script.main(args) == 1
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("error: a batch of 1,000,000,000 images needs about ")
    assert "(10,498 values per image)" in err and err.endswith("available; lower --batch-size")
    assert not out.exists()


def test_a_torch_run_says_nothing_of_jax_compilation(idx_dir, tmp_path, capsys):
    assert train_script.main(lenet_args(idx_dir, tmp_path / "run", backend="torch")) == 0
    out = capsys.readouterr()
    assert "compilation cache" not in out.out + out.err


def test_help_lists_every_nets_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        train_script.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "  lenet          fashion_mnist, adam lr 0.001, batch 256, 5 epochs\n" in out
    assert ("  resnet20       cifar10, sgd lr 0.1, batch 128, 200 epochs, momentum 0.9, weight "
            "decay 0.0001, lr x0.1 at epochs 100/150, crop+flip\n") in out
    assert "  dilated        fashion_mnist, adam lr 0.0003, batch 64, 25 epochs, 20% validation split" in out


def test_resume_takes_neither_out_nor_force(finished, capsys):
    with pytest.raises(SystemExit) as e:
        train_script.main(["--resume", str(finished), "--force"])
    assert e.value.code == 2
    assert "--resume continues the run in RUN_DIR; it takes neither --out nor --force" in capsys.readouterr().err
