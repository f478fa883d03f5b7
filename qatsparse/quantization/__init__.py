"""INT8 / FP16 fake quantization placed the way TensorRT fuses it, calibration, and helpers."""

from qatsparse.quantization.calibrate import calibrate
from qatsparse.quantization.calibrators import CALIBRATORS, MaxCalibrator, make_calibrator
from qatsparse.quantization.config import QuantConfig
from qatsparse.quantization.fakequant import fake_quantize_int8, fake_quantize_int8_aten, fake_quantize_int8_fusable
from qatsparse.quantization.modules import (
    QuantConv2d,
    QuantLinear,
    QuantSummary,
    is_quantized,
    prepare_for_onnx_export,
    quantize_model,
    quantizers,
    remove_quantizers,
    set_quantizers_enabled,
)
from qatsparse.quantization.quantizer import TensorQuantizer

__all__ = [
    "CALIBRATORS",
    "MaxCalibrator",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantSummary",
    "TensorQuantizer",
    "calibrate",
    "fake_quantize_int8",
    "fake_quantize_int8_aten",
    "fake_quantize_int8_fusable",
    "is_quantized",
    "make_calibrator",
    "prepare_for_onnx_export",
    "quantize_model",
    "quantizers",
    "remove_quantizers",
    "set_quantizers_enabled",
]
