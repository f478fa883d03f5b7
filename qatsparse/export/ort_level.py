"""Which ONNX Runtime graph-optimization level validates an exported graph, and why.

ONNX Runtime's default level (``ORT_ENABLE_ALL``) rewrites parts of a Q/DQ graph into its own integer
kernels (``DequantizeLinear -> MatMul`` into ``MatMulIntegerToFloat``, ``QLinearConv``...), whose arithmetic
is not the graph's: on x86 CPUs without VNNI, MLAS multiplies u8 x s8 with ``VPMADDUBSW``, which saturates
the sum of each pair of products at 16 bits (ONNX Runtime's quantization docs recommend ``reduce_range``
there), so int8 values near the range ends give wrong sums. On AlexNet at 224 px the optimized CPU session's
outputs had cosine 0.980 with the PyTorch QAT model against 0.99998 with the optimizations off (issue 11);
two quantized Linears on a 3-D input (exported as MatMul) gave cosine 0.94 between the two levels. A
validation that silently used either level would either blame the export for ONNX Runtime's kernels or
hide what a default ONNX Runtime deployment computes.

So validation probes the graph on the first validation batch at both ends -- the default level and
``ORT_DISABLE_ALL`` (the graph's arithmetic as written, what TensorRT is given) -- and with ``"auto"``
keeps the default where the two agree (cosine >= :data:`AGREE_COSINE` on every output; float rounding
alone moves a few values across an int8 step, which leaves the cosine near 1 - 1e-5) and the unoptimized
graph where they do not, with the reason and the probe's numbers in the report
(``report["onnxruntime"]``) and a note. A fixed level (``"all"``, ``"extended"``, ``"basic"``,
``"disabled"``) is used as given, still probed and reported.

Example:
    >>> import torch; from torch import nn
    >>> from qatsparse.export.onnx import export_onnx
    >>> import tempfile; p = export_onnx(nn.Linear(3, 2), [torch.zeros(1, 3)], tempfile.mkdtemp() + "/m.onnx")
    >>> choose_graph_optimization(p, (torch.randn(4, 3),)).level
    'all'
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qatsparse.export.runners import ORT_LEVELS, OnnxRuntimeRunner

#: the levels qatsparse takes, and ``"auto"``
CHOICES = ("auto", *ORT_LEVELS)
#: outputs of the default and the unoptimized session count as the same at or above this cosine
AGREE_COSINE = 0.999


def check_level(value: Any, owner: str = "TensorRTExport") -> str:
    """``value`` if it is one of :data:`CHOICES`, else a ``ValueError`` naming the valid ones."""
    if value not in CHOICES:
        raise ValueError(f"{owner}(ort_graph_optimization={value!r}): must be one of {list(CHOICES)}")
    return str(value)


@dataclass
class GraphOptimizationChoice:
    """The level validation ran ONNX Runtime at, why, and the probe that decided it.

    Attributes:
        level: one of :data:`~qatsparse.export.runners.ORT_LEVELS`.
        why: one sentence for the report.
        probe: per output, cosine / max abs difference / arg-max agreement of the default level's outputs
            against the unoptimized graph's on the probe batch.
        fused_ops: the operator types the default level put into the graph (e.g. ``MatMulIntegerToFloat``).
    """

    level: str
    why: str
    probe: dict[str, dict[str, float]] = field(default_factory=dict)
    fused_ops: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether the default level changed the numbers of this graph."""
        return any(not _agree(p) for p in self.probe.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "changed_by_default_optimizations": self.changed}


def _agree(p: dict[str, float]) -> bool:
    return p["cosine"] >= AGREE_COSINE


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    fa, fb = a.double().flatten(), b.double().flatten()
    denom = float(fa.norm() * fb.norm())
    cosine = float(fa @ fb) / denom if denom > 0 else float(torch.equal(fa, fb))
    out = {"cosine": cosine, "max_abs_diff": float((fa - fb).abs().max()) if fa.numel() else 0.0}
    if a.dim() == 2 and a.shape[1] > 1:  # (batch, classes): do the two pick the same class?
        out["argmax_agreement"] = float((a.argmax(1) == b.argmax(1)).double().mean())
    return out


def choose_graph_optimization(
    path: str | Path, inputs: Any, requested: str = "auto", output_names: list[str] | None = None
) -> GraphOptimizationChoice:
    """Probe ``path`` on ``inputs`` at the default level and unoptimized; pick the level (see the module doc)."""
    check_level(requested)
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        try:
            runner = OnnxRuntimeRunner(path, optimization="all", save_optimized=optimized)
        except Exception:  # an execution provider that cannot save its graph: probe without saving it
            runner = OnnxRuntimeRunner(path, optimization="all")
        default = runner(inputs)
        fused = _new_ops(path, optimized)
    plain = OnnxRuntimeRunner(path, optimization="disabled")(inputs)
    names = output_names or [f"output_{i}" for i in range(len(plain))]
    probe = {n: _compare(a, b) for n, a, b in zip(names, default, plain)}
    differ = {n: p for n, p in probe.items() if not _agree(p)}
    worst = min(probe.values(), key=lambda p: p["cosine"]) if probe else {"cosine": 1.0}
    if requested != "auto":
        why = f"ort_graph_optimization={requested!r} as given"
        if differ:
            why += f"; the default level changes this graph's outputs (cosine {worst['cosine']:.6f} to unoptimized)"
        return GraphOptimizationChoice(requested, why, probe, fused)
    if not differ:
        return GraphOptimizationChoice(
            "all",
            "ONNX Runtime's default level (ORT_ENABLE_ALL): on the first validation batch its outputs equal the "
            f"unoptimized graph's (cosine >= {AGREE_COSINE})",
            probe,
            fused,
        )
    parts = ", ".join(
        f"{n}: cosine {p['cosine']:.6f}"
        + (f", arg-max agreement {p['argmax_agreement']:.3f}" if "argmax_agreement" in p else "")
        for n, p in differ.items()
    )
    return GraphOptimizationChoice(
        "disabled",
        "ONNX Runtime's default graph optimizations (ORT_ENABLE_ALL) change this graph's outputs on the first "
        f"validation batch ({parts}, against the unoptimized graph; it fused {', '.join(fused) or 'no new op'}): "
        "validated with optimizations off (ORT_DISABLE_ALL), the graph's arithmetic as written and what "
        "TensorRT is given; an ONNX Runtime deployment at the default level on this CPU computes the changed "
        "numbers (ONNX Runtime's integer kernels without VNNI saturate 16-bit pair sums)",
        probe,
        fused,
    )


def _new_ops(original: str | Path, optimized: Path) -> list[str]:
    """Operator types in ``optimized`` that ``original`` does not have (ONNX Runtime's fused kernels)."""
    import onnx

    if not optimized.exists():
        return []
    before = {n.op_type for n in onnx.load(str(original), load_external_data=False).graph.node}
    after = {n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node}
    return sorted(after - before)
