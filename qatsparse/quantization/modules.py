"""Insert and remove fake quantizers in a model without changing its parameters (twins: ``layers.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qatsparse.quantization.config import QuantConfig
from qatsparse.quantization.functional import intercept_functional_linears, remove_functional_interception
from qatsparse.quantization.layers import (
    QuantConv2d,
    QuantLinear,
    activation_quantizer,
    float_class,
    is_quant_layer,
)
from qatsparse.quantization.placement import insert_residual_quantizers, remove_residual_quantizers
from qatsparse.quantization.quantizer import TensorQuantizer
from qatsparse.quantization.twins import quant_class_for

__all__ = ["QuantConv2d", "QuantLinear", "QuantSummary", "quantize_model"]  # the twins live in layers.py


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


def quantize_model(model: nn.Module, config: QuantConfig) -> QuantSummary:
    """Turn every quantizable layer not excluded into its quantized twin, in place.

    Quantizable: Conv1d/Conv2d/ConvTranspose2d/Linear, transformers ``Conv1D`` and ``nn.MultiheadAttention``
    (see :mod:`~qatsparse.quantization.layers`); a Linear whose weight its parent passes to ``F.linear``
    directly is quantized at that call (:mod:`~qatsparse.quantization.functional`). Layers left as they
    are -- excluded, subclasses with their own forward, LSTM, embeddings, ... -- are in
    ``summary.skipped`` with the reason. Quantizers start uncalibrated (identity for INT8) until
    :func:`~qatsparse.quantization.calibrate` runs. Each module keeps its parameters, so optimizers stay
    valid. For INT8 (``config.residual``), the residual input of every ``a + b`` after a quantized layer
    gets a quantizer too (:mod:`~qatsparse.quantization.placement`). The config is recorded on the model
    (``model._qatsparse_quant``) so that checkpoints can be restored into the same structure: the
    result depends only on the model's code and the config.

    Example:
        >>> s = quantize_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2)), QuantConfig())
        >>> s.quantized
        ['0', '2']
    """
    from qatsparse.inventory import not_compressed

    summary = QuantSummary()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for name, m in list(model.named_modules()):
        if is_quant_layer(m):
            summary.quantized.append(name)
            continue
        twin, reason = quant_class_for(m)
        if twin is None:
            if reason is not None:
                summary.skipped[name] = reason
            continue
        if config.keeps(name):
            summary.skipped[name] = str(config.keeps(name))
            continue
        m.__class__ = twin
        twin.add_quantizers(m, config, device)  # type: ignore[attr-defined]
        summary.quantized.append(name)
    for name, why in not_compressed(model, "quantization").items():
        summary.skipped.setdefault(name, why)
    if config.precision == "int8" and config.residual:
        summary.residual, summary.notes = insert_residual_quantizers(model, lambda: activation_quantizer(config))
    summary.notes.update(intercept_functional_linears(model))
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


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized twins of a model by name (each owns its input and weight quantizers).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU()); _ = quantize_model(m, QuantConfig())
        >>> list(quantized_layers(m))
        ['0']
    """
    return {n: m for n, m in model.named_modules() if is_quant_layer(m)}


def layer_quantizers(layer: nn.Module) -> dict[str, TensorQuantizer]:
    """The quantizers a layer owns directly (its children), by attribute name."""
    return {n: c for n, c in layer.named_children() if isinstance(c, TensorQuantizer)}


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
    remove_functional_interception(model)
    remove_residual_quantizers(model)
    for m in list(model.modules()):
        base = float_class(m)
        if base is None:
            continue
        for qn in [n for n, c in m.named_children() if isinstance(c, TensorQuantizer)]:
            delattr(m, qn)
        m.__dict__.pop("_track_overflow", None)
        m.__dict__.pop("_overflow_peak", None)
        m.__class__ = base
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
        if not is_quant_layer(m):
            continue
        for param, q in m.weight_quantizers().items():  # type: ignore[attr-defined]
            w = getattr(m, param)
            if q.precision == "int8" and q.calibrated and q.axis is not None:
                shape = [1] * w.dim()
                shape[q.axis] = -1
                amax = q.amax.reshape(shape).to(w.dtype)
                w.copy_(torch.maximum(torch.minimum(w, amax), -amax))
                q.narrow_range = False
