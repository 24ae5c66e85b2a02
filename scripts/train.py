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


def recipes_epilog() -> str:
    """Each net's recipe defaults, for --help."""
    from flaxnets.recipes import recipe_for

    lines = ["each net's recipe (--epochs, --batch-size and --lr override it):"]
    for n in list_nets():
        r = recipe_for(n)
        parts = [r.dataset, f"{r.optimizer} lr {r.lr:g}", f"batch {r.batch_size}", f"{r.epochs} epochs"]
        if r.momentum:
            parts.append(f"momentum {r.momentum:g}")
        if r.weight_decay:
            parts.append(f"weight decay {r.weight_decay:g}")
        if r.l2:
            parts.append(f"L2 {r.l2:g}")
        if r.milestones:
            parts.append(f"lr x{r.lr_gamma:g} at epochs {'/'.join(map(str, r.milestones))}")
        if r.augment != "none":
            parts.append(r.augment.replace("_", "+"))
        for what, f in (("validation", r.val_fraction), ("test", r.test_fraction)):
            if f:
                parts.append(f"{f:.0%} {what} split")
        lines.append(f"  {n:<15}{', '.join(parts)}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=recipes_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", help=f"one of: {', '.join(list_nets())}")
    p.add_argument("--backend", choices=["jax", "torch"],
                   help="training framework (default jax); with --resume, the framework the run "
                        "continues in: weights, BatchNorm statistics, optimizer state and schedule "
                        "carry over (docs/resume.md)")
    p.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="compute precision (default fp32); bf16 keeps fp32 master weights, "
                        "optimiser state and BatchNorm statistics")
    p.add_argument("--data-dir", help="dataset directory (IDX files, CIFAR pickles or an image folder)")
    p.add_argument("--seed", type=int, help="seed of initialisation, shuffling, augmentation (default 0)")
    p.add_argument("--out", help="run directory (default runs/<net>-<backend>-<timestamp>); "
                                 "one that holds a run is refused unless --force")
    p.add_argument("--force", action="store_true",
                   help="replace the run in --out (its files are deleted once the new run starts)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host JAX: jax.distributed.initialize() from the environment (SLURM, "
                        "Open MPI, TPU, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID); "
                        "process 0 writes the run directory")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (--epochs may extend it)")
    p.add_argument("--resume-from-torch", metavar="CKPT",
                   help="start the run (--net, --out) where a plain PyTorch training script stopped: "
                        "CKPT is torch.save({'model': model.state_dict(), 'optimizer': "
                        "opt.state_dict(), 'epoch': EPOCHS_DONE}, CKPT) of the net's torch_ref "
                        "model and recipe optimizer; training continues at epoch EPOCHS_DONE + 1")
    args = p.parse_args(argv)
    if args.resume is None and args.net is None:
        p.error("--net is required (or --resume RUN_DIR)")
    if args.resume is not None and (args.force or args.out is not None):
        p.error("--resume continues the run in RUN_DIR; it takes neither --out nor --force")
    if args.resume is not None and args.resume_from_torch is not None:
        p.error("--resume continues a run; --resume-from-torch starts one from a PyTorch checkpoint")
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.lr is not None and not (0 < args.lr < float("inf")):
        p.error("--lr must be a positive finite number")
    return args


def resolve(args: argparse.Namespace) -> tuple[dict[str, Any], Path, dict[str, Any] | None]:
    """The run's settings, its directory, and (when resuming) the run's config.json."""
    if args.resume:
        run_dir = Path(args.resume)
        try:
            old = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"cannot resume {run_dir}: no readable config.json ({e})") from None
        for flag in ("net", "seed", "data_dir", "batch_size", "lr", "precision"):
            given = getattr(args, flag)
            stored = (old["recipe"].get(flag, "fp32" if flag == "precision" else None)
                      if flag in ("batch_size", "lr", "precision") else old.get(flag))
            if given is not None and given != stored:
                raise RunError(f"--{flag.replace('_', '-')} {given} differs from the run being "
                               f"resumed ({stored}); a resumed run keeps its settings")
        settings = {k: old[k] for k in ("net", "backend", "seed", "data_dir")}
        settings["backend"] = args.backend or old["backend"]  # another: the run switches to it
        settings["overrides"] = dict(old["overrides"], epochs=args.epochs or old["recipe"]["epochs"])
        return settings, run_dir, old
    settings = {"net": args.net, "backend": args.backend or "jax", "seed": args.seed or 0,
                "data_dir": args.data_dir,
                "overrides": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                              "precision": args.precision}}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else Path("runs") / f"{args.net}-{settings['backend']}-{stamp}"
    return settings, run_dir, None


def memory_limit(backend: str) -> int | None:
    """Bytes a training step may use: the accelerator's memory for JAX on one, else the host's."""
    from flaxnets.runs import host_memory_available

    if backend == "jax":
        import jax

        if jax.default_backend() != "cpu":
            stats = jax.local_devices()[0].memory_stats() or {}
            if stats.get("bytes_limit"):
                return int(stats["bytes_limit"])
    return host_memory_available()


def interrupted(run_dir: Path, backend: str) -> str:
    """What a Ctrl-C leaves, and the command that goes on from there."""
    from flaxnets.fit import checkpoint_paths, has_checkpoint

    again = f"python scripts/train.py --resume {run_dir}"
    if has_checkpoint(checkpoint_paths(run_dir, backend)["last"], backend):
        return f"interrupted; continue with: {again}"
    if (run_dir / "config.json").is_file():
        return f"interrupted before the first epoch ended, so no epoch was saved; start it again with: {again}"
    return "interrupted before training started; nothing was written"


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    settings, run_dir, old = resolve(args)
    name, backend = settings["net"], settings["backend"]
    compile_cache = None
    if backend == "jax":
        from flaxnets.compile_cache import enable_compile_cache

        compile_cache = enable_compile_cache()  # before anything compiles
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
        get_spec(name)
    except UnknownNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not primary:
        return train(args, settings, run_dir, old, compile_cache, primary=False)
    from flaxnets.runs import locked_run_dir, run_files

    with locked_run_dir(run_dir):
        held = run_files(run_dir)
        if not args.resume and held and not args.force:
            raise RunError(f"--out {run_dir} already holds a run ({', '.join(held[:2])}"
                           f"{', …' * (len(held) > 2)}); continue it with --resume {run_dir}, "
                           f"or pass --force to replace it")
        try:
            return train(args, settings, run_dir, old, compile_cache, primary=True)
        except KeyboardInterrupt:
            print(f"\n{interrupted(run_dir, backend)}", file=sys.stderr)
            return 130


def train(args: argparse.Namespace, settings: dict[str, Any], run_dir: Path,
          old: dict[str, Any] | None, compile_cache: Path | None, primary: bool) -> int:
    """Load the data, size the run, train it and write the run directory (``primary`` only).

    Nothing in ``run_dir`` changes before the engine is built and a resumed checkpoint has
    loaded: a refused or failed start leaves an earlier run exactly as it was.
    """
    name, backend, seed = settings["net"], settings["backend"], settings["seed"]
    from flaxnets.data import load_dataset
    from flaxnets.fit import NonFiniteLossError, checkpoint_paths, fit, has_checkpoint
    from flaxnets.recipes import recipe_for
    from flaxnets.introspect import state_bytes
    from flaxnets.runs import (DISK_SLACK_BYTES, prepare_out, remove_paths, remove_run, versions,
                               write_json, write_metrics_csv, write_run)
    from flaxnets.summary import activation_elements, format_summary

    spec = get_spec(name)
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

        rows, total = model_summary(abstract, data.image_shape)
    else:
        import torch_ref
        from torch_ref.introspect import model_summary as torch_summary

        rows, total = torch_summary(torch_ref.create(name, data.num_classes), data.image_shape)
    print(format_summary(name, rows, total))
    per_image = activation_elements(rows)
    need, limit = 4 * per_image * recipe.batch_size, memory_limit(backend)
    if limit is not None and need > limit:
        # float32 layer outputs a step keeps for its backward pass: a floor under what it needs,
        # refused here rather than by an allocation of hundreds of GiB
        raise RunError(f"a batch of {recipe.batch_size:,} images needs about {need / 2**30:,.1f} GiB "
                       f"for its layer outputs ({per_image:,} values per image), more than the "
                       f"{limit / 2**30:,.1f} GiB available; lower --batch-size")
    print(f"recipe: {recipe}")
    last = checkpoint_paths(run_dir, backend)["last"]
    resuming = bool(args.resume)
    src = old["backend"] if old else backend  # the framework the run's checkpoints are in
    src_last = checkpoint_paths(run_dir, src)["last"]
    importer, carried = None, {}
    if resuming and has_checkpoint(src_last, src):
        print(f"resuming {run_dir} from {src_last}"
              + (f", carried from {src} to {backend}" if src != backend else ""))
        if src != backend:
            from parity.train_state import run_importer

            importer = run_importer(run_dir, src)
    elif resuming:
        print(f"{run_dir} stopped before its first epoch ended; training it from the start")
        resuming = False
    if args.resume_from_torch:
        from parity.files import sha256_file
        from parity.train_state import torch_checkpoint_importer

        ckpt = Path(args.resume_from_torch)
        if not ckpt.is_file():
            raise RunError(f"--resume-from-torch {ckpt}: no such file")
        importer, resuming = torch_checkpoint_importer(ckpt), True
        carried = {"resumed_from_torch": {"file": str(ckpt.resolve()), "sha256": sha256_file(ckpt)}}
    now = datetime.now().isoformat(timespec="seconds")
    history = {k: old[k] for k in ("backend_switches", "resumed_from_torch") if old and resuming and k in old}
    config = {"net": name, "backend": backend, "seed": seed, "data_dir": settings["data_dir"],
              "data_source": data.source, "recipe": dataclasses.asdict(recipe),
              "overrides": settings["overrides"], "command": [sys.executable, *sys.argv],
              "versions": versions(), "started": old["started"] if resuming and old else now,
              **({"resumed": now} if resuming and old else {}), **history, **carried,
              "compile_cache": str(compile_cache) if compile_cache else None}

    def on_start(epoch: int) -> None:
        if primary:
            if args.force:
                remove_run(run_dir, keep=("checkpoints",) if importer else ())  # the import's own
            if importer and old:
                config["backend_switches"] = [*config.get("backend_switches", []),
                                              {"from": src, "to": backend, "after_epoch": epoch, "when": now}]
            if carried:
                config["resumed_from_torch"]["after_epoch"] = epoch
            write_json(run_dir / "config.json", config)  # a resume needs it even after a crash
            if importer:
                # the state now lives in this framework's checkpoints, which fit has just written
                # (and, for a run that validates, its best one): the rest is stale
                stale = [*checkpoint_paths(run_dir, "torch" if backend == "jax" else "jax").values()]
                stale += [checkpoint_paths(run_dir, backend)["best"]] if carried else []
                remove_paths(stale)

    def on_epoch(rows: list[dict[str, Any]]) -> None:
        if primary:
            write_metrics_csv(run_dir / "metrics.csv", rows)
        print(epoch_line(rows[-1], recipe.epochs), flush=True)

    try:
        result = fit(name, data, recipe, seed=seed, progress=progress_bar(recipe.epochs),
                     on_epoch=on_epoch, backend=backend, run_dir=run_dir, resume=resuming,
                     on_start=on_start, import_state=importer)
    except NonFiniteLossError as e:
        kept = (f", the last good checkpoint is {last}" if has_checkpoint(last, backend)
                else " before the first epoch ended, so nothing was saved")
        raise RunError(f"{e}; stopped{kept}") from None
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
    if backend == "jax":
        from flaxnets.compile_cache import ENV

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
    from flaxnets.host_malloc import run_under_tcmalloc

    run_under_tcmalloc()  # XLA's per-step block stays mapped between steps (host_malloc.py)
    sys.exit(main())
