"""Run directories: atomic files, config.json, metrics.csv and the run's pictures (no framework
import)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from flaxnets import metrics, plots
from flaxnets.fit import FitResult

# Free space asked of a run directory beyond its checkpoints: pictures, csv files, and slack.
DISK_SLACK_BYTES = 64 << 20


# What a run writes into its directory; a directory holding any of these holds a run.
RUN_FILES = ("config.json", "metrics.csv", "per_class.csv", "curves.png", "confusion_matrix.png",
             "samples.png", "model.pt", "model.safetensors", "checkpoints")
LOCK_FILE = ".lock"


class RunDirError(ValueError):
    """A run directory that cannot be written, or a disk without room for the run's files."""


class RunDirBusyError(RunDirError):
    """Another process is training into the run directory."""


@contextlib.contextmanager
def locked_run_dir(run_dir: Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock while a run writes into it; a second run into it is refused.

    The lock is an flock (``filelock``): the kernel drops it when its process dies, so a killed
    run leaves no stale lock. A directory this call created is removed again if the run left
    nothing in it but the lock file.
    """
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot write to --out {run_dir}: {e.strerror or e}") from None
    lock = filelock.FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RunDirBusyError(f"{run_dir} is in use: another process is training into it "
                              f"(it holds {run_dir / LOCK_FILE}); wait for it to end") from None
    except OSError as e:
        raise RunDirError(f"cannot write to --out {run_dir}: {e.strerror or e}") from None
    try:
        yield run_dir
    finally:
        lock.release()
        if created and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(run_dir, ignore_errors=True)


def run_files(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that a run wrote (empty for a new or unrelated directory)."""
    return [n for n in RUN_FILES if (run_dir / n).exists()]


def remove_run(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete the files an earlier run wrote into ``run_dir`` (``--force``), but those named in
    ``keep``; others stay."""
    remove_paths([run_dir / name for name in run_files(run_dir) if name not in keep])


def remove_paths(paths: list[Path]) -> None:
    """Delete each of ``paths`` that exists, file or directory."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def write_metrics_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """metrics.csv: one row per epoch, rewritten atomically after each epoch (nothing lost on a crash)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode())


def write_json(path: str | Path, obj: dict[str, Any]) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def write_run(run_dir: str | Path, config: dict[str, Any], result: FitResult) -> Path:
    """Write the run's results: config.json (with the final metrics), metrics.csv and curves.png
    (when an epoch was trained), confusion_matrix.png, per_class.csv and samples.png (the first
    32 test images)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(config, test_loss=result.test_loss, test_acc=result.test_acc,
               compile_seconds=result.compile_seconds, class_names=result.class_names, **result.info)
    write_json(run_dir / "config.json", cfg)
    if result.metrics:  # none when a run started from another's state has trained no epoch yet
        write_metrics_csv(run_dir / "metrics.csv", result.metrics)
        plots.plot_curves(result.metrics, run_dir / "curves.png", best_epoch=result.info.get("best_epoch"))
    plots.plot_confusion(result.confusion, result.class_names, run_dir / "confusion_matrix.png",
                         title=f"test accuracy {result.test_acc:.4f}")
    metrics.write_per_class(result.confusion, result.class_names, run_dir / "per_class.csv")
    n = min(32, len(result.test_preds))
    plots.plot_samples(result.test_images[:n], result.test_labels[:n], result.test_preds[:n],
                       result.class_names, run_dir / "samples.png", n=n)
    return run_dir


def versions() -> dict[str, str]:
    """Versions of Python and the frameworks, for config.json."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def host_memory_available() -> int | None:
    """Bytes of memory the kernel says a new allocation can get (MemAvailable), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def prepare_out(run_dir: Path, need_bytes: int) -> None:
    """Create ``run_dir`` and prove it writable with enough free space, before any training."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to --out {run_dir}: {e.strerror or e}") from None
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise RunDirError(f"not enough disk space in {run_dir}: {free / 2**20:,.0f} MiB free, "
                       f"the run's checkpoints and exports need about {need_bytes / 2**20:,.0f} MiB")
