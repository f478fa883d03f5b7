"""Export to ONNX (FP32, Q/DQ INT8 + FP16, FP16), lint, runners for every backend, TensorRT build (lazy import).

``qatsparse.export.lint(path)`` is the lint function (its module stays importable as ``qatsparse.export.lint``
for ``Finding`` and the rest).
"""

from qatsparse.export.folding import fold_constants
from qatsparse.export.fp16 import FP16Conversion, convert_to_fp16
from qatsparse.export.graph import module_name_of_node
from qatsparse.export.lint import Finding, lint, lint_errors
from qatsparse.export.metadata import get_metadata, record_pruned_layers, set_metadata
from qatsparse.export.onnx import export_onnx
from qatsparse.export.runners import OnnxRuntimeRunner, Runner, TorchRunner

__all__ = [
    "FP16Conversion",
    "Finding",
    "OnnxRuntimeRunner",
    "Runner",
    "TorchRunner",
    "convert_to_fp16",
    "export_onnx",
    "fold_constants",
    "get_metadata",
    "lint",
    "lint_errors",
    "module_name_of_node",
    "record_pruned_layers",
    "set_metadata",
]
