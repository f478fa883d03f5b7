"""report.png: the verdict and why, every metric against its allowed drop, latency, and what was compressed."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

_COLORS = {"pytorch_fp32": "#7f7f7f", "pytorch_qat": "#4C72B0", "onnxruntime": "#DD8452", "tensorrt": "#55A868"}
_OTHER = ["#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]
_FAIL = "#C44E52"


def metric_names(report: dict[str, Any]) -> list[str]:
    """The metrics any backend of ``report`` has, sorted."""
    return sorted({m for b in report["backends"].values() for m in b["metrics"]})


def _bound(report: dict[str, Any], metric: str) -> float | None:
    bound = report["gate"]["max_metric_drop"]
    b = bound.get(metric) if isinstance(bound, dict) else bound
    return None if b is None else float(b)


def _metric_panel(ax: Any, report: dict[str, Any], metric: str, names: list[str], colors: list[str]) -> None:
    ref = report["reference"]
    vals = [report["backends"][n]["metrics"].get(metric, float("nan")) for n in names]
    hib = (report.get("metrics") or {}).get(metric, {}).get("higher_is_better", True)
    b = _bound(report, metric)
    drops = [report["backends"][n].get("drop_vs_reference", {}).get(metric) for n in names]
    failing = [n != ref and b is not None and d is not None and d > b for n, d in zip(names, drops)]
    bars = ax.bar(names, vals, color=[_FAIL if f else c for f, c in zip(failing, colors)])
    ax.bar_label(bars, fmt="%.4g", fontsize=8)
    ax.set_title(f"{metric} ({'higher' if hib else 'lower'} is better)", fontsize=10,
                 color=_FAIL if any(failing) else "black")  # fmt: skip
    ref_val = report["backends"].get(ref, {}).get("metrics", {}).get(metric)
    limit = None
    if b is not None and ref_val is not None and b >= 0:
        limit = ref_val - b if hib else ref_val + b
    finite = [v for v in [*vals, *([limit] if limit is not None else [])] if v == v]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max((hi - lo) * 0.5, 0.02 * max(abs(hi), 1e-6))
        ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
    if limit is not None:
        ax.axhline(limit, color=_FAIL, ls="--", lw=1)
        ax.annotate(f"allowed: drop <= {b:.4g}", (0.99, limit), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", fontsize=7, color=_FAIL)  # fmt: skip
    for i, (f, d) in enumerate(zip(failing, drops)):
        if f:
            ax.annotate(f"FAILS\ndrop {d:.4g} > {b:.4g}", (i, vals[i]), xytext=(0, -28), textcoords="offset points",
                        ha="center", fontsize=7, color="white", fontweight="bold")  # fmt: skip


def _latency_panel(ax: Any, report: dict[str, Any], names: list[str], colors: list[str]) -> None:
    lats = [report["backends"][n].get("latency_ms") or {} for n in names]
    vals = [x.get("median_per_batch", 0.0) for x in lats]
    bars = ax.bar(names, vals, color=colors, hatch=None)
    for bar, x in zip(bars, lats):
        if x.get("indicative"):
            bar.set_hatch("//")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    size = next((x.get("batch_size") for x in lats if x), "?")
    indicative = any(x.get("indicative") for x in lats)
    ax.set_title(f"ms per batch of {size} (median)" + (", hatched: CPU, indicative" if indicative else ""), fontsize=9)


def _compression_panel(ax: Any, report: dict[str, Any], names: list[str], colors: list[str]) -> None:
    shares = [(report["backends"][n].get("sparsity") or {}).get("weights_2to4_share") for n in names]
    keep = [(n, v, c) for n, v, c in zip(names, shares, colors) if v is not None]
    if keep:
        bars = ax.barh([n for n, _, _ in keep], [v for _, v, _ in keep], color=[c for _, _, c in keep])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xlim(0, 1.35)
    ax.set_title("2:4 weight share, measured on each backend's artifact", fontsize=9)
    sp, q = report.get("sparsity") or {}, report.get("quantization") or {}
    lines = [f"pruned layers: {len(sp.get('pruned_layers') or [])}, skipped: {len(sp.get('skipped') or {})}"]
    if q.get("precision") and q.get("precision") != "fp32":
        lines.append(
            f"quantized: {len(q.get('quantized') or [])} layers {q['precision']}"
            + (f", calibrator {q['calibrator']}" if q.get("calibrator") and q["precision"] == "int8" else "")
        )
        kept = len(q.get("keep_fp32") or [])
        if kept:
            lines.append(f"kept in higher precision: {kept}")
        if q.get("fp16_overflow"):
            lines.append(f"FP16 overflow: {len(q['fp16_overflow'])} layer(s)")
    else:
        lines.append("not quantized (FP32)")
    ax.text(0.98, 0.02, "\n".join(lines), transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#cccccc"})  # fmt: skip
    ax.tick_params(axis="y", labelsize=8)


def plot(report: dict[str, Any], path: Path) -> None:
    """Write :func:`figure` as a PNG to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def figure(report: dict[str, Any]) -> Any:
    """report.png's figure: one panel per metric (bars per backend, the allowed drop dashed, failing bars red with
    their drop and bound written on them), the median latency, and a sparsity/quantization panel; the verdict in
    the title and, for a failed run, the gate's failure messages under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["backends"])
    panels = [*metric_names(report), "latency", "compression"]
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    failures = list(report["gate"]["failures"])
    head = 0.9 + 0.25 * min(len(failures), 4)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 4.3 * nrows + head), squeeze=False)
    extra = iter(_OTHER)
    colors = [_COLORS.get(n) or next(extra, "#333333") for n in names]
    for k, panel in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        if panel == "latency":
            _latency_panel(ax, report, names, colors)
        elif panel == "compression":
            _compression_panel(ax, report, names, colors)
        else:
            _metric_panel(ax, report, panel, names, colors)
        if panel != "compression":
            ax.tick_params(axis="x", rotation=15, labelsize=8)
            ax.grid(axis="y", alpha=0.3)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    verdict = "PASSED" if report["passed"] else "FAILED"
    title = f"qatsparse: {verdict} (reference {report['reference']}, {report['samples']} samples)"
    why = [textwrap.shorten(f, 150) for f in failures[:4]] + (["..."] if len(failures) > 4 else [])
    fig.suptitle("\n".join([title, *why]), color="#2E7D32" if report["passed"] else "#C62828", fontweight="bold",
                 fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - head / (4.3 * nrows + head) * 0.9))
    return fig
