"""Thin Lightning callbacks over qatsparse's pure functions."""

from qatsparse.callbacks.export import TensorRTExport
from qatsparse.callbacks.quantization import QuantizationAwareTraining
from qatsparse.callbacks.sparsity import TwoFourSparsity

__all__ = ["QuantizationAwareTraining", "TensorRTExport", "TwoFourSparsity"]
