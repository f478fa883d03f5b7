"""What a QAT run reports of its model: the console table of what is quantized with which amax, the layers kept
in higher precision, and the model's entries of report.json's ``quantization`` section.

Example:
    >>> from torch import nn
    >>> from qatsparse.quantization import QuantConfig, quantize_model
    >>> m = nn.Sequential(nn.Linear(4, 4)); config = QuantConfig(exclude=["0"])
    >>> kept_fp32(config, quantize_model(m, config))
    ['0']
"""

from __future__ import annotations

import io
from typing import Any

from torch import nn

from qatsparse.quantization.config import QuantConfig
from qatsparse.quantization.modules import QuantSummary, quantizers

__all__ = ["describe_quantization", "kept_fp32", "summary_entries"]


def kept_fp32(config: QuantConfig, summary: QuantSummary | None) -> list[str]:
    """Layers kept in higher precision on purpose: excluded by the user, auto-excluded, FP16 overflow."""
    if summary is None:
        return sorted(config.higher_precision)
    return sorted({n for n in summary.skipped if config.keeps(n)} | set(config.higher_precision))


def describe_quantization(model: nn.Module, config: QuantConfig, summary: QuantSummary) -> str:
    """A summary table of what is quantized and with which amax."""
    from rich.console import Console
    from rich.table import Table

    qs = quantizers(model)
    int8 = config.precision == "int8"
    title = (
        f"QAT ({config.precision}, calibrator={config.calibrator}): "
        f"{len(summary.quantized)} layers quantized, {len(summary.residual)} residual quantizers"
    )
    table = Table(title=title)
    for col in ("layer", "precision", "input amax", "weight amax (min..max)", "note"):
        table.add_column(col)
    for name in summary.quantized:
        a, w = qs.get(f"{name}.input_quantizer"), qs.get(f"{name}.weight_quantizer")
        if a is None or w is None:
            continue
        amax_in = f"{float(a.amax):.4g}" if int8 else "-"
        amax_w = f"{float(w.amax.min()):.4g}..{float(w.amax.max()):.4g}" if int8 else "-"
        table.add_row(name, config.precision, amax_in, amax_w, "")
    for name, what in summary.residual.items():
        table.add_row(name, "int8", f"{float(qs[name].amax):.4g}", "-", what)
    for name, why in summary.skipped.items():
        table.add_row(name, "fp32", "-", "-", why)
    buf = io.StringIO()
    Console(file=buf, width=140, color_system=None).print(table)
    lines = [buf.getvalue().rstrip()]
    lines += [f"  note {n}: {why}" for n, why in summary.notes.items()]
    return "\n".join(lines)


def summary_entries(model: nn.Module, config: QuantConfig, summary: QuantSummary) -> dict[str, Any]:
    """The model's entries of the report: ``quantized``, ``skipped``, ``residual_quantizers``, ``notes`` and,
    for INT8, ``input_amax``/``residual_amax``."""
    qs = quantizers(model)
    out: dict[str, Any] = {
        "quantized": summary.quantized,
        "skipped": summary.skipped,
        "residual_quantizers": summary.residual,
        "notes": summary.notes,
    }
    if config.precision == "int8":
        out["input_amax"] = {
            n: float(qs[f"{n}.input_quantizer"].amax) for n in summary.quantized if f"{n}.input_quantizer" in qs
        }
        out["residual_amax"] = {n: float(qs[n].amax) for n in summary.residual if n in qs}
    return out
