"""Evaluate trained weights: python scripts/evaluate.py --net lenet --weights runs/RUN [--backend torch]."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from flaxnets.registry import UnknownNetError, get_spec, list_nets

# Run as ``python scripts/NAME.py``, Python puts scripts/ first on sys.path, and scripts/parity.py
# would then hide the parity package: take that entry off (the packages are installed).
if __name__ == "__main__" and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]


def main(argv: list[str] | None = None) -> int:
    """Print accuracy and the per-class table; write confusion_matrix.png, per_class.csv, samples.png."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--net", required=True, help=f"one of: {', '.join(list_nets())}")
    p.add_argument("--weights", required=True,
                   help="a run directory (its model.pt), or a .pt/.pth/.th/.bin or .safetensors weights file")
    p.add_argument("--data-dir", help="the recipe's data (as for train.py) or an image folder")
    p.add_argument("--backend", default="jax", choices=["jax", "torch"],
                   help="framework that runs the net on the weights: jax (Flax, the weights converted) "
                        "or torch (torch_ref); default jax")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean after scaling to [0, 1]")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std after scaling to [0, 1]")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per forward pass (at least 1; default 256)")
    p.add_argument("--seed", type=int, help="split seed for carved-out test sets (default: the run's)")
    p.add_argument("--out", help="where the pictures go (default runs/eval-<net>-<backend>-<time>)")
    args = p.parse_args(argv)
    try:
        get_spec(args.net)
    except UnknownNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from flaxnets import metrics, plots
    from flaxnets.compile_cache import enable_compile_cache

    enable_compile_cache()
    from flaxnets.evaluate import evaluate
    from parity.convert import StateDictMismatchError

    try:
        r = evaluate(args.net, args.weights, args.data_dir, args.backend,
                     tuple(args.mean) if args.mean else None, tuple(args.std) if args.std else None,
                     args.batch_size, args.seed)
    except StateDictMismatchError as e:
        print(f"error: {args.weights} does not hold {args.net!r} weights: {e.summary()}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:  # WeightsFileError is a ValueError
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    for note in r.notes:
        print(f"note: {note}")
    print(f"weights: {r.weights_file}  backend: {args.backend}  data: {r.data_source}, "
          f"{len(r.labels)} images")
    print(metrics.per_class_text(r.confusion, r.class_names))
    print(f"test accuracy {r.accuracy:.4f}, loss {r.loss:.4f}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"eval-{args.net}-{args.backend}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_confusion(r.confusion, r.class_names, out / "confusion_matrix.png",
                         title=f"{args.net} ({args.backend}) accuracy {r.accuracy:.4f}")
    metrics.write_per_class(r.confusion, r.class_names, out / "per_class.csv")
    n = min(32, len(r.labels))
    plots.plot_samples(r.images[:n], r.labels[:n], r.preds[:n], r.class_names, out / "samples.png", n=n)
    print(f"pictures: {out / 'confusion_matrix.png'}  {out / 'samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
