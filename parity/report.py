"""Text rendering of parity results: one row per net, then what failed and where."""

from __future__ import annotations

from parity.check import F32_ERROR_RATIO, GRAD_RTOL, LOGIT_RTOL, ParityResult

HEADER = (f"| net | params | out shape | eval logits Δ | train logits Δ (f64) "
          f"| train f32 error: flax / torch | BN stats Δ | grads rel Δ (f64) | round trip | verdict |\n"
          f"|---|---:|---|---:|---:|---:|---:|---:|---|---|")


def _num(v: float) -> str:
    return "—" if v != v else f"{v:.1e}"  # NaN -> not measured


def row(r: ParityResult) -> str:
    """One markdown table row for ``r``."""
    return (f"| {r.name} | {r.flax_params:,} | {tuple(r.output_shape)} | {_num(r.logits_delta)} "
            f"| {_num(r.train_logits_delta)} | {_num(r.train_f32_error)} / {_num(r.torch_f32_error)} "
            f"| {_num(r.bn_stats_delta)} | {_num(r.grads_delta)} "
            f"| {'bit-exact' if r.roundtrip_exact else 'DIFFERS'} | {'PASS' if r.ok else 'FAIL'} |")


def details(r: ParityResult) -> list[str]:
    """Lines explaining a failed row: each failure, the first divergent layer if any, and the known
    traps ``compare`` named as causes."""
    lines = [f"{r.name}: {f}" for f in r.failures]
    if r.divergence is not None:
        d = r.divergence
        mode = f" ({r.compare.divergence_mode})" if r.compare is not None and r.compare.divergence_mode else ""
        lines.append(f"{r.name}: first divergent layer{mode} {d.path} ({d.kind}, output {tuple(d.shape)}): "
                     f"Δ {d.delta:.2e} > {LOGIT_RTOL:.0e}")
    lines += [f"{r.name}: why: {t}" for t in (r.compare.traps if r.compare is not None else [])]
    return lines


TOLERANCES = (f"tolerances: eval logits and BN stats max|Δ| ≤ {LOGIT_RTOL:.0e}·max(1, max|ref|) (CPU fp32); "
              f"train logits the same in float64, and in float32 no farther from the float64 logits than "
              f"{F32_ERROR_RATIO:g}× torch's own float32 error (at least {LOGIT_RTOL:.0e}); "
              f"gradients max|Δ| ≤ {GRAD_RTOL:.0e}·max|g| per parameter (float64, both frameworks)")
