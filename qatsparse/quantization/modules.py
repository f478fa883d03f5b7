"""Insert and remove fake quantizers in a model without changing its parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qatsparse.quantization.config import QuantConfig
from qatsparse.quantization.fp16 import record_peak
from qatsparse.quantization.placement import insert_residual_quantizers, remove_residual_quantizers
from qatsparse.quantization.quantizer import TensorQuantizer


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input and weight pass through ``input_quantizer``/``weight_quantizer``.

    Made by changing the class of an existing ``nn.Conv2d`` in place (see :func:`quantize_model`),
    so its parameters -- and the optimizer state that refers to them -- are untouched.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(4, 8, 3)); _ = quantize_model(m, QuantConfig()); type(m[0]).__name__
        'QuantConv2d'
    """

    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer
    #: FP16 overflow tracking (see :mod:`qatsparse.quantization.fp16`); a Python flag, no GPU sync.
    _track_overflow = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        if self._track_overflow:
            record_peak(self, x, out)
        return out


class QuantLinear(nn.Linear):
    """``nn.Linear`` with input and weight quantizers (see :class:`QuantConv2d`).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8)); _ = quantize_model(m, QuantConfig()); type(m[0]).__name__
        'QuantLinear'
    """

    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer
    _track_overflow = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        if self._track_overflow:
            record_peak(self, x, out)
        return out


#: float class -> quantized class. Only these exact types are swapped: a user subclass may have its
#: own forward, which a class swap would silently drop.
QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
FLOAT_CLASSES = {v: k for k, v in QUANT_CLASSES.items()}


@dataclass
class QuantSummary:
    """Which layers were quantized, which were kept in higher precision (with the reason), where the
    residual quantizers went, and notes on forwards that could not be searched for residual adds.

    Example:
        >>> s = quantize_model(nn.Sequential(nn.Linear(4, 4)), QuantConfig(exclude=["0"])); s.skipped
        {'0': 'excluded by user'}
    """

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    residual: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def _weight_quantizer(module: nn.Module, cfg: QuantConfig) -> TensorQuantizer:
    if cfg.precision == "fp16":
        return TensorQuantizer("fp16")
    return TensorQuantizer("int8", axis=0, num_channels=module.weight.shape[0], narrow_range=True)


def _activation_quantizer(cfg: QuantConfig, recompute: bool = True) -> TensorQuantizer:
    if cfg.precision == "fp16":
        return TensorQuantizer("fp16")
    return TensorQuantizer(
        "int8",
        calibrator=cfg.calibrator,
        calibrator_kwargs=cfg.calibrator_kwargs(),
        recompute=cfg.recompute and recompute,
    )


def quantize_model(model: nn.Module, config: QuantConfig) -> QuantSummary:
    """Turn every ``nn.Conv2d``/``nn.Linear`` not excluded into its quantized twin, in place.

    Quantizers start uncalibrated (identity for INT8) until :func:`~qatsparse.quantization.calibrate`
    runs. Each module keeps its parameters, so optimizers stay valid. For INT8 (``config.residual``),
    the residual input of every ``a + b`` after a quantized layer gets a quantizer too
    (:mod:`~qatsparse.quantization.placement`). The config is recorded on the model
    (``model._qatsparse_quant``) so that checkpoints can be restored into the same structure: the
    result depends only on the model's code and the config.

    Example:
        >>> s = quantize_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2)), QuantConfig())
        >>> s.quantized
        ['0', '2']
    """
    summary = QuantSummary()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for name, m in model.named_modules():
        if isinstance(m, tuple(QUANT_CLASSES.values())):
            summary.quantized.append(name)
            continue
        if not isinstance(m, tuple(QUANT_CLASSES)):
            continue
        if type(m) not in QUANT_CLASSES:
            summary.skipped[name] = f"subclass {type(m).__name__} of a supported layer (own forward kept)"
        elif config.keeps(name):
            summary.skipped[name] = str(config.keeps(name))
        else:
            m.__class__ = QUANT_CLASSES[type(m)]
            m.add_module("input_quantizer", _activation_quantizer(config).to(device))
            m.add_module("weight_quantizer", _weight_quantizer(m, config).to(device))
            summary.quantized.append(name)
    if config.precision == "int8" and config.residual:
        # A residual quantizer's output goes into an add, whose backward keeps nothing: only its mask is
        # kept, and recomputing it would keep its (wider) input instead.
        residual = lambda: _activation_quantizer(config, recompute=False)  # noqa: E731
        summary.residual, summary.notes = insert_residual_quantizers(model, residual)
    model._qatsparse_quant = config.to_dict()  # type: ignore[assignment]
    return summary


def requantize(model: nn.Module, config: QuantConfig) -> QuantSummary:
    """Rebuild the quantizers of ``model`` for ``config`` (e.g. with more layers kept in higher
    precision), keeping the calibrated ``amax`` and the on/off state of every quantizer that remains.

    Calibration sees the float model (every quantizer is the identity while calibrating), so the
    ``amax`` of a quantizer does not depend on which other layers are quantized: no recalibration.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)); _ = quantize_model(m, QuantConfig())
        >>> requantize(m, QuantConfig(higher_precision={"1": "sensitive"})).skipped
        {'1': 'sensitive'}
    """
    old = {n: (q.amax.detach().clone(), q.enabled) for n, q in quantizers(model).items()}
    remove_quantizers(model)
    summary = quantize_model(model, config)
    for n, q in quantizers(model).items():
        if n in old and old[n][0].shape == q.amax.shape:
            q.load_amax(old[n][0])
            q.enabled = old[n][1]
    return summary


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """All quantizers of a model by name.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4)); _ = quantize_model(m, QuantConfig()); list(quantizers(m))
        ['0.input_quantizer', '0.weight_quantizer']
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds any quantizer."""
    return any(isinstance(m, TensorQuantizer) for m in model.modules())


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every quantizer on or off (off = the float model, bit for bit)."""
    for q in quantizers(model).values():
        q.enabled = enabled


def remove_quantizers(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_model` in place: plain float modules with the same parameters.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4)); _ = quantize_model(m, QuantConfig())
        >>> type(remove_quantizers(m)[0]).__name__
        'Linear'
    """
    remove_residual_quantizers(model)
    for m in list(model.modules()):
        if type(m) in FLOAT_CLASSES:
            del m.input_quantizer
            del m.weight_quantizer
            m.__dict__.pop("_track_overflow", None)
            m.__dict__.pop("_overflow_peak", None)
            m.__class__ = FLOAT_CLASSES[type(m)]
    if hasattr(model, "_qatsparse_quant"):
        del model._qatsparse_quant
    return model


@torch.no_grad()
def prepare_for_onnx_export(model: nn.Module) -> None:
    """Make a quantized model's INT8 weights exportable, in place, without changing what it computes.

    The TorchScript exporter accepts only the range [-128, 127], TensorRT's weights use [-127, 127]:
    each weight is clamped to [-amax, amax] of its channel, after which no weight can round to -128,
    and the weight quantizers switch to the [-128, 127] range -- so the exported graph computes
    exactly what the narrow-range fake quantization computed in training.
    """
    for m in model.modules():
        if type(m) in FLOAT_CLASSES:
            q = m.weight_quantizer
            if q.precision == "int8" and q.calibrated and q.axis is not None:
                shape = [-1] + [1] * (m.weight.dim() - 1)
                amax = q.amax.reshape(shape).to(m.weight.dtype)
                m.weight.copy_(torch.maximum(torch.minimum(m.weight, amax), -amax))
                q.narrow_range = False
