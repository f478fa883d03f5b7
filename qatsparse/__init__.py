"""qatsparse: 2:4 sparsity, INT8/FP16 quantization-aware training, Q/DQ ONNX, TensorRT, validation.

Example:
    >>> from qatsparse import TwoFourSparsity, QuantizationAwareTraining, TensorRTExport
    >>> callbacks = [TwoFourSparsity(start_step=0, exclude=["fc"]),
    ...              QuantizationAwareTraining(precision="int8", calib_batches=16, start_step=200),
    ...              TensorRTExport(dirpath="export/", max_metric_drop=0.01)]
"""

from qatsparse._version import __version__
from qatsparse.callbacks import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
from qatsparse.checkpointing import CompressedCheckpointMixin, load_from_checkpoint, restore_structure

__all__ = [
    "CompressedCheckpointMixin",
    "QuantizationAwareTraining",
    "TensorRTExport",
    "TwoFourSparsity",
    "__version__",
    "load_from_checkpoint",
    "restore_structure",
]
