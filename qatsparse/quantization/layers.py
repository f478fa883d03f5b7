"""The quantized twins of the layers TensorRT runs as GEMMs/convolutions.

A twin is the layer's own class with fake quantizers on the inputs and weights TensorRT quantizes. It
is made by changing the class of an existing module in place (:func:`~qatsparse.quantization.quantize_model`),
so its parameters -- and the optimizer state and 2:4 masks that refer to them -- are untouched. Which twin a
layer gets is decided in :mod:`qatsparse.quantization.twins`.

Example:
    >>> is_quant_layer(QuantLinear(4, 4)), is_quant_layer(nn.Linear(4, 4))
    (True, False)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qatsparse.quantization.config import QuantConfig
from qatsparse.quantization.fp16 import record_peak
from qatsparse.quantization.quantizer import TensorQuantizer


def weight_quantizer(config: QuantConfig, weight: torch.Tensor, axis: int) -> TensorQuantizer:
    """Per-channel symmetric INT8 along ``axis`` (narrow range, TensorRT's weights), or FP16 rounding."""
    if config.precision == "fp16":
        return TensorQuantizer("fp16")
    return TensorQuantizer("int8", axis=axis, num_channels=weight.shape[axis], narrow_range=True)


def activation_quantizer(config: QuantConfig) -> TensorQuantizer:
    """Per-tensor symmetric INT8 with the configured calibrator, or FP16 rounding."""
    if config.precision == "fp16":
        return TensorQuantizer("fp16")
    return TensorQuantizer("int8", calibrator=config.calibrator, calibrator_kwargs=config.calibrator_kwargs())


class QuantLayer:
    """What the twins share: quantizers as child modules, and which weight each one quantizes.

    ``_qatsparse_float`` is the class the twin came from (:func:`~qatsparse.quantization.remove_quantizers`
    goes back to it).
    """

    _qatsparse_float: type[nn.Module]
    #: axis of the output channels of ``weight`` (per-channel weight scales run along it)
    weight_axis = 0
    #: quantizers that some calls legitimately never use: calibration leaves them uncalibrated
    optional_quantizers: tuple[str, ...] = ()
    #: FP16 overflow tracking (see :mod:`qatsparse.quantization.fp16`); a Python flag, no GPU sync.
    _track_overflow = False

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why this module cannot be quantized although its type can (None when it can)."""
        return None

    @classmethod
    def add_quantizers(cls, module: nn.Module, config: QuantConfig, device: torch.device) -> None:
        module.add_module("input_quantizer", activation_quantizer(config).to(device))
        module.add_module("weight_quantizer", weight_quantizer(config, module.weight, cls.weight_axis).to(device))

    def weight_quantizers(self) -> dict[str, TensorQuantizer]:
        """``{parameter name: its quantizer}``."""
        return {"weight": self.weight_quantizer}  # type: ignore[attr-defined]


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight pass through ``input_quantizer``/``weight_quantizer``.

    Example:
        >>> from qatsparse.quantization import quantize_model
        >>> m = nn.Sequential(nn.Conv2d(4, 8, 3)); _ = quantize_model(m, QuantConfig()); type(m[0]).__name__
        'QuantConv2d'
    """

    _qatsparse_float = nn.Conv2d
    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        if self._track_overflow:
            record_peak(self, x, out)
        return out


class QuantConv1d(QuantLayer, nn.Conv1d):
    """``nn.Conv1d`` with input and weight quantizers (TensorRT runs it as a 2-D convolution).

    Example:
        >>> from qatsparse.quantization import quantize_model
        >>> m = nn.Sequential(nn.Conv1d(4, 8, 3)); _ = quantize_model(m, QuantConfig()); type(m[0]).__name__
        'QuantConv1d'
    """

    _qatsparse_float = nn.Conv1d
    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer
    forward = QuantConv2d.forward  # type: ignore[assignment]


class QuantConvTranspose2d(QuantLayer, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (groups=1) with input and weight quantizers; weight scales along axis 1.

    Example:
        >>> from qatsparse.quantization import quantize_model
        >>> m = nn.Sequential(nn.ConvTranspose2d(4, 8, 2)); _ = quantize_model(m, QuantConfig())
        >>> m[0].weight_quantizer.axis
        1
    """

    _qatsparse_float = nn.ConvTranspose2d
    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer
    weight_axis = 1

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        groups = getattr(module, "groups", 1)
        return f"grouped ConvTranspose2d (groups={groups}): not quantized" if groups != 1 else None

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:  # type: ignore[override]
        output_padding = self._output_padding(
            x,
            output_size,
            self.stride,  # type: ignore[arg-type]
            self.padding,  # type: ignore[arg-type]
            self.kernel_size,  # type: ignore[arg-type]
            2,
            self.dilation,  # type: ignore[arg-type]
        )
        out = F.conv_transpose2d(
            self.input_quantizer(x),
            self.weight_quantizer(self.weight),
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )
        if self._track_overflow:
            record_peak(self, x, out)
        return out


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with input and weight quantizers (see :class:`QuantConv2d`).

    Example:
        >>> from qatsparse.quantization import quantize_model
        >>> m = nn.Sequential(nn.Linear(4, 8)); _ = quantize_model(m, QuantConfig()); type(m[0]).__name__
        'QuantLinear'
    """

    _qatsparse_float = nn.Linear
    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        if self._track_overflow:
            record_peak(self, x, out)
        return out


class QuantHFConv1D(QuantLayer):
    """transformers' ``Conv1D`` (GPT-2: a Linear whose weight is ``(in, out)``) with input and weight quantizers.

    Combined with the transformers class when a model is quantized (transformers is not imported here);
    the weight's scales run along its output axis, 1. In ONNX it is a Gemm with ``transB=0``.
    """

    weight_axis = 1
    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)  # type: ignore[attr-defined]
        xq = self.input_quantizer(x).view(-1, x.size(-1))
        out = torch.addmm(self.bias, xq, self.weight_quantizer(self.weight)).view(size_out)  # type: ignore[attr-defined]
        if self._track_overflow:
            record_peak(self, x, out)
        return out


def float_class(module: nn.Module) -> type[nn.Module] | None:
    """The class a twin came from, or None for a module that is not a quantized twin."""
    return getattr(type(module), "_qatsparse_float", None) if isinstance(module, QuantLayer) else None


def is_quant_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized twin (it owns input/weight quantizers)."""
    return isinstance(module, QuantLayer)
