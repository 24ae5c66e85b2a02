"""Train a registered net with its recipe: python scripts/train.py --net lenet --backend jax."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxnets.registry import UnknownNetError, get_spec, list_nets  # noqa: E402


class ProgressBar:
    """A one-line text progress bar on stderr, redrawn about 50 times per epoch."""

    def __init__(self, epochs: int, width: int = 30):
        self.epochs, self.width, self.last = epochs, width, -1

    def __call__(self, epoch: int, step: int, steps: int) -> None:
        filled = self.width * step // steps
        if filled == self.last and step != steps:
            return
        self.last = filled
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\repoch {epoch + 1}/{self.epochs} [{bar}] {step}/{steps}")
        if step == steps:
            sys.stderr.write("\r" + " " * (self.width + 40) + "\r")
            self.last = -1
        sys.stderr.flush()


def epoch_line(row: dict, epochs: int) -> str:
    """One printed line per epoch."""
    ev = "val" if "val_loss" in row else "test"
    return (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.2g}  "
            f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
            f"{ev} loss {row[f'{ev}_loss']:.4f} acc {row[f'{ev}_acc']:.4f}  "
            f"{row['images_per_s']:,.0f} img/s  {row['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--net", required=True, help=f"one of: {', '.join(list_nets())}")
    p.add_argument("--backend", default="jax", choices=["jax", "torch"])
    p.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--data-dir", help="dataset directory (IDX files, CIFAR pickles or an image folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run directory (default runs/<net>-<backend>-<timestamp>)")
    args = p.parse_args(argv)
    try:
        spec = get_spec(args.net)
    except UnknownNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.backend == "torch":
        print("error: --backend torch is not implemented yet; use --backend jax", file=sys.stderr)
        return 2

    from flaxnets import create
    from flaxnets.data import load_dataset
    from flaxnets.train import fit, format_summary, model_summary, recipe_for, write_run

    recipe = recipe_for(args.net, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    from flax import nnx

    abstract = nnx.eval_shape(lambda: create(args.net, seed=args.seed))  # shapes only: no slow init
    print(format_summary(args.net, *model_summary(abstract, spec.input_shape)))
    t0 = time.perf_counter()
    try:
        data = load_dataset(recipe.dataset, args.data_dir, size=spec.input_shape[:2],
                            channels=spec.input_shape[2])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"data: {recipe.dataset} from {data.source}: {len(data.x_train)} train, "
          f"{len(data.x_test)} test, {data.num_classes} classes ({time.perf_counter() - t0:.1f} s)")
    print(f"recipe: {recipe}")
    try:
        result = fit(args.net, data, recipe, seed=args.seed, progress=ProgressBar(recipe.epochs),
                     on_epoch=lambda row: print(epoch_line(row, recipe.epochs), flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else Path("runs") / f"{args.net}-{args.backend}-{stamp}"
    config = {"net": args.net, "backend": args.backend, "seed": args.seed, "data_dir": args.data_dir,
              "data_source": data.source, "recipe": recipe.__dict__, "wall_seconds": wall}
    write_run(run_dir, config, result)
    extra = f" (best val acc {result.info['best_val_acc']:.4f})" if result.eval_split == "val" else ""
    print(f"final test accuracy {result.test_acc:.4f}, loss {result.test_loss:.4f}{extra}; "
          f"compile {result.compile_seconds:.1f} s, wall {wall:.1f} s")
    print(f"run written to {run_dir}: config.json, metrics.csv")
    print(f"pictures: {run_dir / 'curves.png'}  {run_dir / 'confusion_matrix.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
