"""The report: report.json (the contract), report.md (a table per backend), report.png, console."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from qatsparse.validation import ValidationResult, metric_drops


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced the artifacts (absent ones are skipped)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "qatsparse",
        "torch",
        "torchvision",
        "pytorch-lightning",
        "onnx",
        "onnxruntime",
        "torchmetrics",
        "tensorrt",
        "polygraphy",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda"] = str(torch.version.cuda)
            out["gpu"] = torch.cuda.get_device_name()
    except Exception:  # pragma: no cover - informational only
        pass
    return out


def build_report(
    result: ValidationResult,
    passed: bool,
    failures: list[str],
    max_metric_drop: Any,
    precisions: dict[str, str],
    sparsity: dict[str, Any],
    quantization: dict[str, Any],
    artifacts: dict[str, str],
    notes: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the ``report.json`` dictionary (keys fixed by the public contract)."""
    drops = metric_drops(result)
    backends = {
        name: {
            "metrics": result.metrics.get(name, {}),
            "drop_vs_reference": drops.get(name, {}),
            "latency_ms": result.latency_ms.get(name, {}),
            "precision": precisions.get(name, ""),
        }
        for name in result.metrics
    }
    report = {
        "reference": result.reference,
        "samples": result.samples,
        "backends": backends,
        "agreement": result.agreement,
        "sparsity": sparsity,
        "quantization": quantization,
        "gate": {"max_metric_drop": max_metric_drop, "failures": failures},
        "passed": passed,
        "artifacts": artifacts,
        "notes": notes or [],
        "versions": library_versions(),
    }
    report.update(extra or {})
    return report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def report_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-backend table (shared by Markdown and console output)."""
    metric_names = sorted({m for b in report["backends"].values() for m in b["metrics"]})
    header = [
        "backend",
        "precision",
        *metric_names,
        *(f"drop {m}" for m in metric_names),
        "top-1 agreement",
        "ms/batch (median)",
        "2:4 weight share",
    ]
    share = report.get("sparsity", {}).get("weights_2to4_share")
    rows = []
    for name, b in report["backends"].items():
        agree = report["agreement"].get(name, {})
        top1 = [a["top1_agreement"] for a in agree.values() if "top1_agreement" in a]
        rows.append(
            [
                name,
                b.get("precision", ""),
                *(_fmt(b["metrics"].get(m, "")) for m in metric_names),
                *(
                    _fmt(b["drop_vs_reference"].get(m, "")) if name != report["reference"] else "ref"
                    for m in metric_names
                ),
                "ref" if name == report["reference"] else (", ".join(f"{t:.4f}" for t in top1) or "-"),
                _fmt(b["latency_ms"].get("median_per_batch", "")),
                _fmt(share) if share is not None and name != report["reference"] else "-",
            ]
        )
    return header, rows


def to_markdown(report: dict[str, Any]) -> str:
    header, rows = report_rows(report)
    lines = [
        "# qatsparse report",
        "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}** -- reference `{report['reference']}`, "
        f"{report['samples']} validation samples, max metric drop {report['gate']['max_metric_drop']}.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    if report["gate"]["failures"]:
        lines += ["## Gate failures", "", *(f"- {f}" for f in report["gate"]["failures"]), ""]
    sp = report.get("sparsity") or {}
    if sp:
        lines += [
            "## Sparsity",
            "",
            f"- 2:4 weight share: {_fmt(sp.get('weights_2to4_share', 0.0))}",
            f"- pruned layers: {len(sp.get('pruned_layers', []))}",
        ]
        for name, why in (sp.get("skipped") or {}).items():
            lines.append(f"- skipped `{name}`: {why}")
        lines.append("")
    q = report.get("quantization") or {}
    if q:
        lines += [
            "## Quantization",
            "",
            f"- precision: {q.get('precision', '-')}",
            f"- quantized layers: {len(q.get('quantized', []))}",
        ]
        for name, why in (q.get("skipped") or {}).items():
            lines.append(f"- kept in higher precision `{name}`: {why}")
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    lines += ["## Artifacts", "", *(f"- {k}: `{v}`" for k, v in report["artifacts"].items()), ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Bar charts of each metric and of the median per-batch latency, one bar per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["backends"])
    metric_names = sorted({m for b in report["backends"].values() for m in b["metrics"]})
    panels = [*metric_names, "latency"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]
    for ax, panel in zip(axes[0], panels):
        if panel == "latency":
            vals = [report["backends"][n]["latency_ms"].get("median_per_batch", 0.0) for n in names]
            ax.set_title("latency, ms per batch (median)")
        else:
            vals = [report["backends"][n]["metrics"].get(panel, 0.0) for n in names]
            ax.set_title(panel)
            lo = min(vals) if vals else 0.0
            ax.set_ylim(max(0.0, lo - 0.05 * max(abs(lo), 1e-3)), max(vals) * 1.02 if vals else 1)
        bars = ax.bar(names, vals, color=colors[: len(names)])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.suptitle(f"qatsparse -- {'PASSED' if report['passed'] else 'FAILED'} (reference {report['reference']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_console(report: dict[str, Any]) -> None:
    """A rich table of the report on the console."""
    from rich.console import Console
    from rich.table import Table

    header, rows = report_rows(report)
    status = "[green]PASSED[/green]" if report["passed"] else "[red]FAILED[/red]"
    table = Table(title=f"qatsparse report: {status}")
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    console = Console(width=None if Console().is_terminal else 160)
    console.print(table)
    for f in report["gate"]["failures"]:
        console.print(f"[red]gate:[/red] {f}")
    for n in report.get("notes", []):
        console.print(f"[dim]{n}[/dim]")


def write_report(report: dict[str, Any], dirpath: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``dirpath``."""
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "report.json", "md": d / "report.md", "png": d / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(to_markdown(report))
    plot(report, paths["png"])
    return paths
