"""Text rendering of parity results: one row per net, then what failed and where."""

from __future__ import annotations

from parity.check import GRAD_RTOL, LOGIT_RTOL, ParityResult

HEADER = (f"| net | params | out shape | eval logits Δ | train logits Δ | BN stats Δ | grads rel Δ (f64) "
          f"| round trip | verdict |\n|---|---:|---|---:|---:|---:|---:|---|---|")


def _num(v: float) -> str:
    return "—" if v != v else f"{v:.1e}"  # NaN -> not measured


def row(r: ParityResult) -> str:
    """One markdown table row for ``r``."""
    return (f"| {r.name} | {r.flax_params:,} | {tuple(r.output_shape)} | {_num(r.logits_delta)} "
            f"| {_num(r.train_logits_delta)} | {_num(r.bn_stats_delta)} | {_num(r.grads_delta)} "
            f"| {'bit-exact' if r.roundtrip_exact else 'DIFFERS'} | {'PASS' if r.ok else 'FAIL'} |")


def details(r: ParityResult) -> list[str]:
    """Lines explaining a failed row: each failure, and the first divergent layer if any."""
    lines = [f"{r.name}: {f}" for f in r.failures]
    if r.divergence is not None:
        d = r.divergence
        lines.append(f"{r.name}: first divergent layer {d.path} ({d.kind}, output {tuple(d.shape)}): "
                     f"Δ {d.delta:.2e} > {LOGIT_RTOL:.0e}")
    return lines


TOLERANCES = (f"tolerances: logits and BN stats max|Δ| ≤ {LOGIT_RTOL:.0e}·max(1, max|ref|) (CPU fp32); "
              f"gradients max|Δ| ≤ {GRAD_RTOL:.0e}·max|g| per parameter (float64, both frameworks)")
