"""Export to ONNX (FP32, Q/DQ INT8), runners for every backend, TensorRT build (lazy import)."""

from qatsparse.export.onnx import export_onnx, module_name_of_node, record_pruned_layers, set_metadata
from qatsparse.export.runners import OnnxRuntimeRunner, Runner, TorchRunner

__all__ = [
    "OnnxRuntimeRunner",
    "Runner",
    "TorchRunner",
    "export_onnx",
    "module_name_of_node",
    "record_pruned_layers",
    "set_metadata",
]
