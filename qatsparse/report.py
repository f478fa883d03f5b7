"""The report: report.json (the contract), report.md (a table per backend), report.png, console."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qatsparse.environment import device_info, library_versions
from qatsparse.report_figure import metric_names as _metric_names
from qatsparse.report_figure import plot
from qatsparse.validation_result import ValidationResult, is_higher_better, metric_drops

__all__ = ["build_report", "device_info", "library_versions", "plot", "print_console", "to_markdown", "write_report"]


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
    backend_sparsity: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble the ``report.json`` dictionary (keys fixed by the public contract).

    ``backend_sparsity`` is what each backend runs, measured on its own artifact (module, ONNX graph, engine);
    it becomes the backend's ``sparsity`` entry.

    Example:
        >>> r = ValidationResult("pytorch_fp32", metrics={"pytorch_fp32": {"top1": 0.9}})
        >>> sorted(build_report(r, True, [], 0.01, {}, {}, {}, {})["backends"])
        ['pytorch_fp32']
    """
    drops = metric_drops(result)
    backends = {
        name: {
            "metrics": result.metrics.get(name, {}),
            "drop_vs_reference": drops.get(name, {}),
            "latency_ms": result.latency_ms.get(name, {}),
            "precision": precisions.get(name, ""),
            "sparsity": (backend_sparsity or {}).get(name, {}),
        }
        for name in result.metrics
    }
    report = {
        "reference": result.reference,
        "samples": result.samples,
        "outputs": result.outputs,
        "metrics": {
            m: {"output": result.metric_outputs.get(m), "higher_is_better": is_higher_better(result, m)}
            for m in sorted({m for ms in result.metrics.values() for m in ms})
        },
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


def _kept_lines(sp: dict[str, Any]) -> list[str]:
    """Magnitude kept by 2:4, per layer with and without the channel permutation, and what it left alone."""
    kept = sp.get("kept_magnitude") or {}
    if not kept:
        return []
    o, layers = kept.get("overall") or {}, kept.get("layers") or {}
    with_perm = o.get("permuted") is not None
    lines = [
        f"- magnitude kept by 2:4 (sum |w| kept / sum |w|): {_pct(o.get('permuted') if with_perm else o.get('plain'))}"
        + (f" with channel permutation, {_pct(o.get('plain'))} without" if with_perm else " (no channel permutation)"),
        "",
    ]
    lines += _md_table(
        ["layer", "kept, plain 2:4", "kept, permuted"],
        [[f"`{n}`", _pct(v.get("plain")), _pct(v.get("permuted"))] for n, v in layers.items()],
    )
    p = sp.get("permutation") or {}
    if p.get("skipped"):
        lines.append(f"- channel permutation not applied: {p['skipped']}")
    for name, why in (p.get("not_permuted") or {}).items():
        lines.append(f"- not permuted `{name}`: {why}")
    return lines


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}%"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1000 else f"{v:.4f}"
    return str(v)


def _share_cell(b: dict[str, Any]) -> str:
    sp = b.get("sparsity") or {}
    if "weights_2to4_share" in sp:
        return _fmt(sp["weights_2to4_share"])
    if sp.get("sparse_layers_picked") is not None:
        return f"{sp['sparse_layers_picked']} layers picked sparse"
    return "-"


def report_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-backend table (shared by Markdown and console output).

    Latency and samples/s come from the same median (see :mod:`qatsparse.latency`); a ``*`` marks CPU
    latencies, which are indicative only. The 2:4 share is measured on what each backend runs.
    """
    metric_names = _metric_names(report)
    header = [
        "backend",
        "precision",
        *metric_names,
        *(f"drop {m}" for m in metric_names),
        "top-1 agreement",
        "ms/batch (median)",
        "samples/s (same median)",
        "2:4 weight share",
    ]
    ref = report["reference"]
    rows = []
    for name, b in report["backends"].items():
        agree = report["agreement"].get(name, {})
        top1 = [f"{o}: {a['top1_agreement']:.4f}" for o, a in agree.items() if "top1_agreement" in a]
        if len(agree) == 1:
            top1 = [t.split(": ", 1)[1] for t in top1]
        lat = b.get("latency_ms", {})
        mark = "*" if lat.get("indicative") else ""
        rows.append(
            [
                name,
                b.get("precision", ""),
                *(_fmt(b["metrics"].get(m, "-")) for m in metric_names),
                *(_fmt(b["drop_vs_reference"].get(m, "-")) if name != ref else "ref" for m in metric_names),
                "ref" if name == ref else (", ".join(top1) or "-"),
                f"{lat['median_per_batch']:.3f}{mark}" if "median_per_batch" in lat else "-",
                f"{lat['throughput_per_s']:.1f}{mark}" if "throughput_per_s" in lat else "-",
                _share_cell(b),
            ]
        )
    return header, rows


def latency_note(report: dict[str, Any]) -> str:
    """How the table's latency was measured, in one sentence."""
    lats = [b.get("latency_ms") or {} for b in report["backends"].values()]
    lats = [x for x in lats if x]
    if not lats:
        return "No latency was measured (too few validation batches)."
    x = lats[0]
    text = (
        f"Latency: median time per validation batch of {x.get('batch_size')} over {x.get('batches')} batch(es) after "
        f"{x.get('warmup_batches', 0)} warm-up batch(es), host copies included, backends in rotating order; "
        "samples/s is the batch size divided by that same median."
    )
    if any(x.get("indicative") for x in lats):
        text += " * measured on the CPU inside the validation loop: indicative only (`qatsparse bench` measures)."
    return text


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def to_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the verdict, one row per backend, agreement per output, then the details."""
    header, rows = report_rows(report)
    lines = [
        "# qatsparse report",
        "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}** -- reference `{report['reference']}`, "
        f"{report['samples']} validation samples, max metric drop {report['gate']['max_metric_drop']}.",
        "",
        *_md_table(header, rows),
        "",
        latency_note(report),
        "",
    ]
    metrics = report.get("metrics") or {}
    if metrics:
        lines += ["## Metrics", ""]
        for m, info in metrics.items():
            direction = "higher is better" if info.get("higher_is_better") else "lower is better"
            lines.append(f"- `{m}` on output `{info.get('output')}` ({direction})")
        lines.append("")
    if report["agreement"]:
        lines += ["## Agreement with the reference", ""]
        arows = []
        for backend, per_out in report["agreement"].items():
            for out, a in per_out.items():
                arows.append(
                    [
                        backend,
                        out,
                        _fmt(a["max_abs_err"]),
                        _fmt(a["mean_abs_err"]),
                        f"{a['cosine']:.6f}",
                        _fmt(a.get("top1_agreement", "-")),
                    ]
                )
        lines += [*_md_table(["backend", "output", "max abs err", "mean abs err", "cosine", "top-1 agr."], arows), ""]
    if report["gate"]["failures"]:
        lines += ["## Gate failures", "", *(f"- {f}" for f in report["gate"]["failures"]), ""]
    if report.get("lint"):
        lines += ["## ONNX lint", ""]
        lines += [f"- **{f['severity']}** `{f['check']}` `{f['node']}`: {f['message']}" for f in report["lint"]]
        lines.append("")
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
        lines += _kept_lines(sp)
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
        for name in q.get("keep_fp32") or []:
            lines.append(f"- kept in FP32 in the FP16 graph: `{name}`")
        lines.append("")
    if report.get("engine"):
        e = report["engine"]
        sp = e.get("sparsity") or {}
        picked = sp.get("picked")
        lines += [
            "## TensorRT engine",
            "",
            f"- built by {e.get('built_by', 'qatsparse')}; TensorRT {e.get('tensorrt', '-')}, strongly typed: "
            f"{e.get('strongly_typed', '-')}, flags: {', '.join(e.get('builder_flags', [])) or '-'}",
            f"- build {e.get('build_seconds', '-')} s, {e.get('engine_bytes', '-')} bytes",
            f"- layer precisions: {(e.get('inspector') or {}).get('precision_counts')}",
            f"- sparse kernels picked: {'unknown (' + sp.get('source', '') + ')' if picked is None else len(picked)}; "
            f"eligible (log): {len(sp.get('eligible') or [])}; weights qualify (inspector): "
            f"{len(sp.get('weights_qualify') or [])}",
            "",
        ]
    if report.get("tensorrt_bundle"):
        tb = report["tensorrt_bundle"]
        lines += [
            "## TensorRT hand-off",
            "",
            f"`{tb['folder']}`: `build.sh` (trtexec, TensorRT {'-'.join(tb['targets']['tensorrt'])}), `check.sh` "
            f"(Polygraphy {tb['targets']['polygraphy']}), `inputs.npz` and the outputs for it; its README gives the "
            "three steps on a TensorRT machine.",
            "",
        ]
    if report.get("notes"):
        lines += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    lines += ["## Artifacts", "", *(f"- {k}: `{v}`" for k, v in report["artifacts"].items()), ""]
    return "\n".join(lines)


def print_console(report: dict[str, Any]) -> None:
    """A rich table of the report on the console."""
    from rich.console import Console
    from rich.table import Table

    header, rows = report_rows(report)
    status = "[green]PASSED[/green]" if report["passed"] else "[red]FAILED[/red]"
    table = Table(title=f"qatsparse report: {status} (reference {report['reference']}, {report['samples']} samples)")
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console = Console(width=None if Console().is_terminal else 160)
    console.print(table)
    console.print(f"[dim]{latency_note(report)}[/dim]")
    for f in report["gate"]["failures"]:
        console.print(f"[red]gate:[/red] {f}")
    errors = [f for f in report.get("lint", []) if f.get("severity") == "error"]
    if report.get("lint"):
        console.print(f"[yellow]ONNX lint:[/yellow] {len(report['lint'])} finding(s), {len(errors)} error(s)")
        for f in errors[:10]:
            console.print(f"  [red]{f['check']}[/red] {f['node']}: {f['message']}")
    for n in report.get("notes", []):
        console.print(f"[dim]{n}[/dim]")


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats written as the strings ``"inf"``, ``"-inf"``, ``"nan"``: strict JSON
    has no Infinity/NaN, and an overflow peak or an unmeasurable throughput can be one.

    Example:
        >>> json_safe({"peak": float("inf"), "x": [1.0, float("nan")]})
        {'peak': 'inf', 'x': [1.0, 'nan']}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], dirpath: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``dirpath`` (each atomically)."""
    from qatsparse.export.atomic import atomic_path

    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "report.json", "md": d / "report.md", "png": d / "report.png"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(json_safe(report), indent=2, default=str, allow_nan=False) + "\n")
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(to_markdown(report))
    with atomic_path(paths["png"]) as tmp:
        plot(report, tmp)
    return paths
