"""Convert weights between PyTorch (.pt/.pth/.th/.bin) and .safetensors files.

python scripts/convert.py --net NAME IN OUT [--num-classes N] [--force]

IN is read as found (wrappers, module./_orig_mod. prefixes, CUDA-saved, legacy format, old
torchvision keys); the format of OUT follows its file name. After converting, both frameworks
run on a fixed random batch and their eval logits must agree within the parity tolerance.

This converts weights (and BatchNorm statistics). A run's whole training state (optimizer state,
schedule, epochs, metrics) is carried by scripts/train.py: --resume RUN --backend jax|torch
continues a run in the other framework, and --net NAME --resume-from-torch CKPT --out RUN a plain
PyTorch checkpoint torch.save({'model': ..., 'optimizer': ..., 'epoch': e}) (docs/resume.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flaxnets.registry import UnknownNetError, get_spec, list_nets

# Run as ``python scripts/NAME.py``, Python puts scripts/ first on sys.path, and scripts/parity.py
# would then hide the parity package: take that entry off (the packages are installed).
if __name__ == "__main__" and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, convert, print what was done; 0 on success, 1 with one error on stderr."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", required=True, help=f"the net the weights belong to ({', '.join(list_nets())})")
    p.add_argument("input", type=Path, metavar="IN",
                   help="weights file to read (.pt .pth .th .bin .safetensors)")
    p.add_argument("output", type=Path, metavar="OUT", help="file to write; its suffix chooses the format")
    p.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="class count (default: the rows of the classifier weight in IN)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = p.parse_args(argv)

    from parity.convert import StateDictMismatchError
    from parity.files import FORMAT_NAMES, ConversionCheckError, WeightsFileError, convert_file

    try:
        get_spec(args.net)
        c = convert_file(args.input, args.output, args.net, args.num_classes, force=args.force)
    except (WeightsFileError, ConversionCheckError, StateDictMismatchError, UnknownNetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    from parity.check import LOGIT_RTOL  # imported by the check already

    w = c.weights
    print(f"read   {c.src}: {FORMAT_NAMES[w.format]}, {_size(c.src)}, sha256 {w.sha256[:16]}…")
    for note in w.notes:
        print(f"       {note}")
    print(f"net    {c.net}: {w.num_classes} classes, {c.params:,} parameters, {len(w.state_dict)} tensors")
    print(f"check  eval logits torch vs Flax on a fixed random batch {'×'.join(map(str, c.batch_shape))}: "
          f"max|Δ| {c.delta:.1e} ≤ tolerance {c.tolerance:.1e} ({LOGIT_RTOL:.0e}·max(1, max|logits|))")
    print(f"wrote  {c.dst}: {FORMAT_NAMES[c.dst_format]}, {_size(c.dst)}, reads back bit-exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
