"""Layers a QAT run keeps in higher precision after it started, each with its reason in
``QuantConfig.higher_precision``: not reached by the calibration batches, outside the FP16 range, or among the
most sensitive to quantization. The caller requantizes the model afterwards (:func:`requantize`).

Example:
    >>> from torch import nn
    >>> from qatsparse.quantization import QuantConfig, quantize_model
    >>> m = nn.Sequential(nn.Linear(4, 4)); config = QuantConfig(precision="fp16")
    >>> _ = quantize_model(m, config); keep_overflowing(m, config, "calibration batches")
    {}
"""

from __future__ import annotations

from torch import nn

from qatsparse.quantization.calibrate import unreached_layers
from qatsparse.quantization.config import QuantConfig
from qatsparse.quantization.fp16 import overflowing_layers
from qatsparse.quantization.sensitivity import LayerSensitivity

__all__ = ["keep_most_sensitive", "keep_overflowing", "keep_unreached"]


def keep_unreached(model: nn.Module, config: QuantConfig) -> dict[str, list[str]]:
    """Keep the layers whose forward the calibration batches never ran; returns them with their quantizers."""
    missing = unreached_layers(model)
    for name, qs in missing.items():
        config.higher_precision[name] = (
            f"not reached by the calibration batches ({', '.join(qs)} saw no data: its forward did not run)"
        )
    return missing


def keep_overflowing(model: nn.Module, config: QuantConfig, where: str) -> dict[str, float]:
    """Keep the layers outside the FP16 range on ``where`` (:func:`overflowing_layers`); returns their peaks."""
    flagged = overflowing_layers(model)
    for name, peak in flagged.items():
        config.higher_precision[name] = f"fp16 overflow on {where} (peak |x| {peak:.4g})"
    return flagged


def keep_most_sensitive(rows: list[LayerSensitivity], k: int, config: QuantConfig) -> dict[str, str]:
    """Keep the first ``k`` layers of a sensitivity ranking; returns them with the reason."""
    keep = {
        r.name: f"auto-excluded: sensitivity rank {i} (metric drop {r.drop:.4g})" for i, r in enumerate(rows[:k], 1)
    }
    config.higher_precision.update(keep)
    return keep
