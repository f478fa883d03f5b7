"""INT8 / FP16 fake quantization placed the way TensorRT fuses it, calibration, and helpers."""

from qatsparse.quantization.attention import QuantMultiheadAttention
from qatsparse.quantization.calibrate import calibrate
from qatsparse.quantization.calibrators import (
    CALIBRATORS,
    HistogramCalibrator,
    MaxCalibrator,
    make_calibrator,
)
from qatsparse.quantization.config import QuantConfig
from qatsparse.quantization.fakequant import fake_quantize_int8, fake_quantize_int8_aten, fake_quantize_int8_fusable
from qatsparse.quantization.fp16 import FP16_MAX, overflowing_layers, track_overflow
from qatsparse.quantization.histogram import entropy_amax, mse_amax, percentile_amax
from qatsparse.quantization.layers import (
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantHFConv1D,
    QuantLayer,
    QuantLinear,
)
from qatsparse.quantization.modules import (
    QuantSummary,
    is_quantized,
    layer_quantizers,
    prepare_for_onnx_export,
    quantize_model,
    quantized_layers,
    quantizers,
    remove_quantizers,
    requantize,
    set_quantizers_enabled,
)
from qatsparse.quantization.placement import insert_residual_quantizers, remove_residual_quantizers
from qatsparse.quantization.quantizer import TensorQuantizer, fake_cast_fp16
from qatsparse.quantization.sensitivity import LayerSensitivity, format_sensitivity, sensitivity
from qatsparse.quantization.twins import quant_class_for

__all__ = [
    "CALIBRATORS",
    "FP16_MAX",
    "HistogramCalibrator",
    "LayerSensitivity",
    "MaxCalibrator",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvTranspose2d",
    "QuantHFConv1D",
    "QuantLayer",
    "QuantLinear",
    "QuantMultiheadAttention",
    "QuantSummary",
    "TensorQuantizer",
    "calibrate",
    "entropy_amax",
    "fake_cast_fp16",
    "fake_quantize_int8",
    "fake_quantize_int8_aten",
    "fake_quantize_int8_fusable",
    "format_sensitivity",
    "insert_residual_quantizers",
    "is_quantized",
    "layer_quantizers",
    "make_calibrator",
    "mse_amax",
    "overflowing_layers",
    "percentile_amax",
    "prepare_for_onnx_export",
    "quant_class_for",
    "quantize_model",
    "quantized_layers",
    "quantizers",
    "remove_quantizers",
    "remove_residual_quantizers",
    "requantize",
    "sensitivity",
    "set_quantizers_enabled",
    "track_overflow",
]
