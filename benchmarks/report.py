"""The markdown tables of benchmark reports, and the section of a markdown file they fill.

    python -m benchmarks.report benchmarks/results/X.json [Y.json ...]            # print them
    python -m benchmarks.report benchmarks/results/X.json --write docs/benchmarks.md

``--write`` replaces what lies between the lines ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` of the file and leaves the rest as it is; a file without exactly one such
pair is an error and is not touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.flops import TRAIN_OVER_FORWARD
from benchmarks.throughput import ABLATED, LABELS, VARIANTS
from flaxnets.registry import list_nets

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
REPO = Path(__file__).resolve().parents[1]


def num(x: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    """A table cell: ``x`` formatted with ``unit`` after it, or '—' where there is no value."""
    return "—" if x is None else format(x, fmt) + unit


def variant_cell(r: dict[str, Any]) -> str:
    """A variant's table cell: its median img/s, else 'failed' or 'timeout'."""
    if r["status"] == "ok":
        return num(r["median_images_per_s"])
    return r["status"].split(":")[0]  # 'failed' or 'timeout'


def _round_text(report: dict[str, Any]) -> str:
    """How long a timed round was: its epochs per net (reports without the count had one)."""
    per = {row["net"]: row.get("epochs_per_round", 1) for row in report["nets"]}
    seconds = report["settings"].get("round_seconds", 0.0)
    if set(per.values()) == {1}:
        return "one epoch per variant"
    return (f"≥ {seconds:g} s of back-to-back epochs per variant ("
            + ", ".join(f"{net} {k}" for net, k in per.items()) + ")")


def format_table(report: dict[str, Any]) -> str:
    """The markdown tables of a report: throughput per net, then the end-to-end runs."""
    heads = ["net", "batch", "input", *(f"{LABELS[v]} img/s" for v in VARIANTS),
             "JAX ÷ best PyTorch eager", "% of peak J / best T", "compile s J / TC"]
    lines = ["| " + " | ".join(heads) + " |", "|---|---:|---|" + "---:|" * (len(heads) - 3)]
    for row in report["nets"]:
        vs = row["variants"]
        pct = row["percent_of_peak"]
        best_t = max((pct[v] for v in pct if v not in ("jax", ABLATED)), default=None)
        comp = [vs[v].get("compile_seconds") if v in vs else None for v in ("jax", "torch_compile")]
        precision = row.get("precision", "fp32")
        cells = [row["net"] + (f" ({precision})" if precision != "fp32" else ""), str(row["batch"]), "×".join(map(str, row["input"])),
                 *(variant_cell(vs[v]) if v in vs else "not run" for v in VARIANTS),
                 num(row["jax_over_best_eager"], ".2f") + ("×" if row["jax_over_best_eager"] else ""),
                 f"{num(pct.get('jax'), '.1f')} / {num(best_t, '.1f')}",
                 f"{num(comp[0], '.1f')} / {num(comp[1], '.1f')}"]
        lines.append("| " + " | ".join(cells) + " |")
    peak = report["peak"]
    m = report["machine"]
    lines += ["", f"Peak FP32 matmul ({peak['n']}×{peak['n']}): JAX {peak['jax']['flops'] / 1e9:.1f}, "
              f"torch {peak['torch']['flops'] / 1e9:.1f} GFLOP/s; % of peak = img/s × training FLOPs "
              f"per image / {peak['peak_flops'] / 1e9:.1f} GFLOP/s, training FLOPs ≈ "
              f"{TRAIN_OVER_FORWARD}× the forward pass's conv/linear multiply-adds × 2.",
              f"Medians of {report['settings']['repeats']} interleaved rounds of "
              f"{report['settings']['steps']}-step epochs after {report['settings']['warmup']} "
              f"warm-up, each round {_round_text(report)} after {report['settings'].get('settle', 0)} "
              f"untimed; JAX ÷ PyTorch pairs the rounds: the median of the best-median eager "
              f"variant's time / JAX's in the same round; compile s: JAX engine build (train+eval "
              f"step, cold), torch.compile first epoch minus a steady one (torch's on-disk caches: warm after a first run). "
              f"{m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
              f"{'malloc ' + m['malloc'] + ', ' if 'malloc' in m else ''}"
              f"{'oneDNN convs ' + m['onednn_convs'] + ', ' if 'onednn_convs' in m else ''}load average "
              f"{m['loadavg_start'][0]:.1f} → {report['loadavg_end'][0]:.1f}."]
    left_out = [n for n in list_nets() if n not in report["settings"]["nets"]]
    if left_out:
        lines.append(f"Not in this run: {', '.join(left_out)} (`--nets all` runs every net).")
    if report["settings"].get("without"):
        lines += ["", format_ablation(report)]
    if report.get("e2e"):
        lines += ["", format_e2e(report["e2e"])]
    return "\n".join(lines)


def format_ablation(report: dict[str, Any]) -> str:
    """What the speed-ups named by --without bring: the JAX engine with and without them."""
    names = ", ".join(report["settings"]["without"])
    lines = [f"| net | JAX img/s | JAX without {names} img/s | speed-up | compile s with / without |",
             "|---|---:|---:|---:|---:|"]
    for row in report["nets"]:
        vs, ratio = row["variants"], row.get("jax_over_ablated")
        comp = [num(vs[v].get("compile_seconds"), ".1f") for v in ("jax", ABLATED)]
        lines.append(f"| {row['net']} | {variant_cell(vs['jax'])} | {variant_cell(vs[ABLATED])} | "
                     f"{num(ratio, '.2f') + ('×' if ratio else '')} | {comp[0]} / {comp[1]} |")
    return "\n".join(lines + ["", "Same engine, traced with and without them, timed interleaved "
                                   "with the variants above (same function, same data)."])


def format_e2e(e2e: dict[str, dict[str, Any]]) -> str:
    """The end-to-end LeNet table, and whether JAX meets the goal: at least 2× faster than the
    tutorial's loop (key ``material``) at equal or better test accuracy."""
    mat = e2e["material"]
    base = mat["wall_seconds"] if mat["status"] == "ok" else None
    lines = ["| LeNet, 5 epochs, end to end | wall s | test acc | speed-up vs material |",
             "|---|---:|---:|---:|"]
    for run in e2e.values():
        ok = run["status"] == "ok"
        speed = num(base / run["wall_seconds"], ".2f") + "×" if ok and base else "—"
        acc = num(run.get("test_acc"), ".4f") if ok else run["status"][:60]
        lines.append(f"| {run['label']} | {run['wall_seconds']:.1f} | {acc} | {speed} |")
    for key, when in (("jax", "first run"), ("jax_warm", "compilation cached")):
        jax_run = e2e.get(key)
        if base and jax_run and jax_run["status"] == "ok":
            speed, acc_ok = base / jax_run["wall_seconds"], jax_run["test_acc"] >= mat["test_acc"]
            met = "met" if speed >= 2 and acc_ok else "not met"
            lines += ["", f"Goal (≥ 2× faster than the material at equal or better accuracy), "
                      f"{when}: {met} — {speed:.2f}×, accuracy {jax_run['test_acc']:.4f} vs "
                      f"{mat['test_acc']:.4f}."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- reports to markdown
class SectionError(ValueError):
    """The markdown file has no single ``BEGIN`` ... ``END`` section to fill."""


def _shown(path: Path) -> str:
    """``path`` inside the repository as a repository path, any other as given."""
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def render(paths: list[Path]) -> str:
    """The tables of each report in ``paths``, in that order, each under the file it comes from."""
    parts = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        try:
            parts.append(f"From `{_shown(Path(path))}` ({report['wall_seconds']:.0f} s in all):\n\n"
                         + format_table(report))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a report of scripts/bench.py (no {e} where one is read)") from e
    return "\n\n".join(parts)


def replace_section(text: str, body: str, where: str = "the file",
                    markers: tuple[str, str] = (BEGIN, END)) -> str:
    """``text`` with the lines between its ``markers`` lines (default ``BEGIN``, ``END``) replaced
    by ``body``."""
    begin, end = markers
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.rstrip() == begin]
    ends = [i for i, line in enumerate(lines) if line.rstrip() == end]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise SectionError(f"{where} needs one line {begin} and, after it, one line {end} around the "
                           f"section to fill; it has {len(begins)} and {len(ends)}"
                           + (", in the wrong order" if len(begins) == len(ends) == 1 else ""))
    return "".join(lines[:begins[0] + 1]) + body.rstrip("\n") + "\n" + "".join(lines[ends[0]:])


def write_section(target: Path, paths: list[Path]) -> None:
    """Fill ``target``'s bench section with the tables of ``paths`` (``target`` untouched on error)."""
    body = (f"<!-- made by: python -m benchmarks.report {' '.join(_shown(Path(p)) for p in paths)} "
            f"--write {_shown(target)} -->\n" + render(paths))
    target.write_text(replace_section(target.read_text(), body, where=str(target)))


def main(argv: list[str] | None = None) -> int:
    """Print the tables of the reports, or write them into a markdown file's bench section."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path, metavar="REPORT",
                   help="JSON reports of scripts/bench.py (its --out), rendered in this order")
    p.add_argument("--write", type=Path, metavar="MARKDOWN",
                   help=f"replace the lines between {BEGIN} and {END} of this file with the tables "
                        "(an error if the file lacks them); without it the tables are printed")
    args = p.parse_args(argv)
    try:
        if args.write:
            write_section(args.write, args.reports)
            print(f"wrote the tables of {len(args.reports)} report(s) into {args.write}")
        else:
            print(render(args.reports))
    except (OSError, ValueError) as e:  # unreadable or malformed input, no section to fill
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
