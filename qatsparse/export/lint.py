"""Lint an ONNX file for what TensorRT will do with it: Q/DQ placement and form, parser support, 2:4.

Each :class:`Finding` names the node and says why it costs speed or accuracy. The rules are TensorRT's
explicit-quantization rules ("Working with Quantized Types" in the TensorRT developer guide) and the
ONNX-TensorRT operator support matrix (``docs/operators.md`` of onnx/onnx-tensorrt, TensorRT 10.15; ops
added later are listed in :data:`TENSORRT_OPS_SINCE` with the release that added them).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qatsparse.export.findings import Finding, Severity, node_name
from qatsparse.export.graph import WEIGHTED_OPS, OnnxGraph
from qatsparse.export.parser_support import (
    TENSORRT_MAX_OPSET,
    TENSORRT_MIN_OPSET,
    TENSORRT_ONNX_OPS,
    TENSORRT_OPS_SINCE,
    check_parser_support,
)
from qatsparse.export.qdq_checks import check_qdq_form, check_qdq_placement

__all__ = [
    "TENSORRT_MAX_OPSET",
    "TENSORRT_MIN_OPSET",
    "TENSORRT_ONNX_OPS",
    "TENSORRT_OPS_SINCE",
    "Finding",
    "Severity",
    "lint",
    "lint_errors",
]


def lint(path: str | Path, intended_output_qdq: Iterable[str] = (), check_sparsity: bool = True) -> list[Finding]:
    """Lint the ONNX file at ``path``; ``[]`` means nothing to report.

    Checks: Q/DQ symmetric with an INT8 zero-point of 0 and constant positive scales; weight scales
    per-channel on the output axis; activation scales per-tensor; Q/DQ on both inputs of every
    Conv/Gemm/MatMul that has one; no Q/DQ on Conv/Gemm outputs (unless the Q node is listed in
    ``intended_output_qdq``); no orphan or dangling Q/DQ; FP32 compute left in a Q/DQ graph (strongly
    typed TensorRT runs it in FP32); operators and opset the TensorRT ONNX parser supports; 2:4 sparsity
    of the layers recorded as pruned in the metadata.

    Example:
        >>> import tempfile, torch
        >>> from qatsparse.export.onnx import export_onnx
        >>> p = export_onnx(torch.nn.Linear(8, 4), [torch.zeros(1, 8)], tempfile.mkdtemp() + "/m.onnx")
        >>> lint(p)
        []
    """
    import onnx

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no ONNX file at {path}")
    model = onnx.load(str(path))
    g = OnnxGraph(model)
    findings: list[Finding] = []
    findings += check_parser_support(g)
    findings += check_qdq_form(g)
    findings += check_qdq_placement(g, set(intended_output_qdq))
    findings += _check_fp32_remainder(g, model)
    if check_sparsity:
        findings += _check_sparsity(path)
    return findings


def lint_errors(findings: Iterable[Finding]) -> list[Finding]:
    """The findings of severity ``"error"``."""
    return [f for f in findings if f.severity == "error"]


# ------------------------------------------------------------------- checks beside parser support and Q/DQ
def _check_fp32_remainder(g: OnnxGraph, model: Any) -> list[Finding]:
    import onnx

    if not any(n.op_type == "QuantizeLinear" for n in g.graph.node):
        return []
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return []
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*inferred.graph.value_info, *inferred.graph.output]
        if vi.type.HasField("tensor_type")
    }
    out = []
    for n in g.graph.node:
        compute = n.op_type in (*WEIGHTED_OPS, "BatchNormalization", "Add", "Mul") and n.output
        if compute and types.get(n.output[0]) == onnx.TensorProto.FLOAT:
            out.append(
                Finding(
                    "fp32-remainder",
                    node_name(n),
                    "warning",
                    f"{n.op_type} computes in FP32 in a Q/DQ graph: strongly typed TensorRT (always on in 11.x) "
                    "runs it in FP32, slower than FP16 (convert the non-quantized remainder to FP16)",
                )
            )
    return out


def _check_sparsity(path: Path) -> list[Finding]:
    from qatsparse.sparsity.check import check_2to4, pruned_layers_from_metadata

    if not pruned_layers_from_metadata(path):  # nothing recorded as pruned: nothing to verify
        return []
    return [
        Finding(
            "sparsity-2to4",
            v.layer,
            "error",
            f"recorded as 2:4-pruned but {v.detail}: TensorRT only runs sparse tensor-core kernels on layers whose "
            "weights are 2:4 along the input channels, so this layer loses the sparse speed-up",
        )
        for v in check_2to4(path, layers="pruned")
    ]
