"""Train a registered net with its recipe: python scripts/train.py --net lenet --backend jax."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flaxnets.registry import UnknownNetError, check_image_shape, get_spec, list_nets

# Run as ``python scripts/NAME.py``, Python puts scripts/ first on sys.path, and scripts/parity.py
# would then hide the parity package: take that entry off (the packages are installed).
if __name__ == "__main__" and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]


def progress_bar(epochs: int) -> Any:
    """``fit``'s progress callback: a tqdm bar per epoch on stderr, silent when not a terminal."""
    bar: Any = None

    def update(epoch: int, step: int, steps: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False,
                       disable=None, file=sys.stderr)  # disable=None: off when not a terminal
        bar.update(step - bar.n)
        if step == steps:
            bar.close()
            bar = None

    return update


def epoch_line(row: dict, epochs: int) -> str:
    """One printed line per epoch."""
    evals = "  ".join(f"{ev} loss {row[f'{ev}_loss']:.4f} acc {row[f'{ev}_acc']:.4f}"
                      for ev in ("val", "test") if f"{ev}_loss" in row)
    return (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.2g}  "
            f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  {evals}  "
            f"{row['images_per_s']:,.0f} img/s  {row['seconds']:.1f} s")


class RunError(Exception):
    """A problem reported as one line on stderr with exit status 1."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--net", help=f"one of: {', '.join(list_nets())}")
    p.add_argument("--backend", choices=["jax", "torch"], help="training framework (default jax)")
    p.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--data-dir", help="dataset directory (IDX files, CIFAR pickles or an image folder)")
    p.add_argument("--seed", type=int, help="seed of initialisation, shuffling, augmentation (default 0)")
    p.add_argument("--out", help="run directory (default runs/<net>-<backend>-<timestamp>)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host JAX: jax.distributed.initialize() from the environment (SLURM, "
                        "Open MPI, TPU, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID); "
                        "process 0 writes the run directory")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (--epochs may extend it)")
    args = p.parse_args(argv)
    if args.resume is None and args.net is None:
        p.error("--net is required (or --resume RUN_DIR)")
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.lr is not None and not args.lr > 0:
        p.error("--lr must be positive")
    return args


def resolve(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """The run's settings (from the command line, or from RUN_DIR/config.json when resuming)."""
    if args.resume:
        run_dir = Path(args.resume)
        try:
            old = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"cannot resume {run_dir}: no readable config.json ({e})") from None
        for flag in ("net", "backend", "seed", "data_dir", "batch_size", "lr"):
            given = getattr(args, flag)
            stored = old["recipe"].get(flag) if flag in ("batch_size", "lr") else old.get(flag)
            if given is not None and given != stored:
                raise RunError(f"--{flag.replace('_', '-')} {given} differs from the run being "
                               f"resumed ({stored}); a resumed run keeps its settings")
        settings = {k: old[k] for k in ("net", "backend", "seed", "data_dir")}
        settings["overrides"] = dict(old["overrides"], epochs=args.epochs or old["recipe"]["epochs"])
        return settings, run_dir
    settings = {"net": args.net, "backend": args.backend or "jax", "seed": args.seed or 0,
                "data_dir": args.data_dir,
                "overrides": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else Path("runs") / f"{args.net}-{settings['backend']}-{stamp}"
    return settings, run_dir


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    settings, run_dir = resolve(args)
    from flaxnets.compile_cache import ENV, enable_compile_cache

    compile_cache = enable_compile_cache()  # before anything compiles
    name, backend, seed = settings["net"], settings["backend"], settings["seed"]
    primary = True  # the process that writes the run directory
    if args.distributed:
        if backend != "jax":
            raise RunError("--distributed is for the JAX backend")
        import jax

        # Cluster environments (SLURM, Open MPI, Kubernetes, Cloud TPU) are detected by JAX; a
        # manual launch sets JAX_COORDINATOR_ADDRESS (read by JAX), JAX_NUM_PROCESSES and
        # JAX_PROCESS_ID (read here: JAX itself does not).
        env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                                  ("process_id", "JAX_PROCESS_ID")) if v in os.environ}
        jax.distributed.initialize(**env)
        primary = jax.process_index() == 0
        print(f"process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} local / {jax.device_count()} global devices")
    try:
        spec = get_spec(name)
    except UnknownNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from flaxnets.data import load_dataset
    from flaxnets.fit import NonFiniteLossError, checkpoint_paths, fit, has_checkpoint
    from flaxnets.recipes import recipe_for
    from flaxnets.introspect import state_bytes
    from flaxnets.runs import DISK_SLACK_BYTES, prepare_out, versions, write_json, write_metrics_csv, write_run
    from flaxnets.summary import format_summary

    recipe = recipe_for(name, **settings["overrides"])
    t0 = time.perf_counter()
    try:
        data = load_dataset(recipe.dataset, settings["data_dir"], size=spec.input_shape[:2],
                            channels=spec.input_shape[2])
    except (FileNotFoundError, ValueError) as e:
        raise RunError(str(e)) from None
    print(f"data: {recipe.dataset} from {data.source}: {len(data.x_train)} train, "
          f"{len(data.x_test)} test, {data.num_classes} classes ({time.perf_counter() - t0:.1f} s)")

    check_image_shape(name, data.image_shape)  # before the summary traces the net with it
    from flax import nnx

    from flaxnets import create

    # shapes only, built once: it sizes the checkpoints and feeds the JAX summary (tracing a
    # deep net abstractly is not free: resnet1202 took minutes here)
    abstract = nnx.eval_shape(lambda: create(name, num_classes=data.num_classes, seed=seed))
    slots = 2 if recipe.optimizer == "adam" else int(bool(recipe.momentum))
    one = state_bytes(abstract, slots)
    if primary:
        prepare_out(run_dir, 2 * one + 2 * one // (1 + slots) + DISK_SLACK_BYTES)  # last, best, 2 exports

    if backend == "jax":
        from flaxnets.introspect import model_summary

        print(format_summary(name, *model_summary(abstract, data.image_shape)))
    else:
        import torch_ref
        from torch_ref.introspect import model_summary as torch_summary

        print(format_summary(name, *torch_summary(torch_ref.create(name, data.num_classes),
                                                  data.image_shape)))
    print(f"recipe: {recipe}")
    config = {"net": name, "backend": backend, "seed": seed, "data_dir": settings["data_dir"],
              "data_source": data.source, "recipe": dataclasses.asdict(recipe),
              "overrides": settings["overrides"], "command": [sys.executable, *sys.argv],
              "versions": versions(), "started": datetime.now().isoformat(timespec="seconds"),
              "compile_cache": str(compile_cache) if compile_cache else None}
    if primary:
        write_json(run_dir / "config.json", config)  # first: a resume needs it even after a crash
    if args.resume:
        last = checkpoint_paths(run_dir, backend)["last"]
        if not has_checkpoint(last, backend):
            raise RunError(f"cannot resume {run_dir}: no finished epoch in {last}")
        print(f"resuming {run_dir} from {last}")

    rows: list[dict[str, Any]] = []

    def on_epoch(row: dict[str, Any]) -> None:
        rows.append(row)
        if primary:
            write_metrics_csv(run_dir / "metrics.csv", rows)
        print(epoch_line(row, recipe.epochs), flush=True)

    try:
        result = fit(name, data, recipe, seed=seed, progress=progress_bar(recipe.epochs),
                     on_epoch=on_epoch, backend=backend, run_dir=run_dir, resume=bool(args.resume))
    except NonFiniteLossError as e:
        last = checkpoint_paths(run_dir, backend)["last"]
        kept = f"the last good checkpoint is {last}" if has_checkpoint(last, backend) else "no epoch finished"
        raise RunError(f"{e}; stopped, {kept}") from None
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python scripts/train.py --resume {run_dir}",
              file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0
    if not primary:
        print(f"final test accuracy {result.test_acc:.4f} (process 0 writes {run_dir})")
        return 0
    write_run(run_dir, dict(config, wall_seconds=wall), result)
    from parity.files import write_weights

    sd = result.engine.torch_state_dict()
    meta = {"net": name, "backend": backend, "test_acc": f"{result.test_acc:.6f}"}
    for fname in ("model.pt", "model.safetensors"):
        write_weights(run_dir / fname, name, sd, data.num_classes, meta=meta, force=True)
    extra = (f" (best val acc {result.info['best_val_acc']:.4f} at epoch {result.info['best_epoch']})"
             if result.eval_split == "val" else "")
    print(f"final test accuracy {result.test_acc:.4f}, loss {result.test_loss:.4f}{extra}; "
          f"compile {result.compile_seconds:.1f} s, wall {wall:.1f} s")
    print(f"compilation cache: {compile_cache or 'off'} ({ENV}=off or a directory to change it)")
    print(f"run written to {run_dir}: config.json, metrics.csv, per_class.csv, model.pt, "
          f"model.safetensors, checkpoints/")
    print(f"pictures: {run_dir / 'curves.png'}  {run_dir / 'confusion_matrix.png'}  "
          f"{run_dir / 'samples.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors the user can fix are one line on stderr, never a traceback."""
    from flaxnets.fit import CheckpointError

    try:
        return run(argv)
    except (RunError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
