"""A QAT model's quantizers back as a checkpoint recorded them: the recorded config applied again, the calibrated
amax values loaded where the state_dict load cannot (FSDP), FP16 overflow tracking on again.

Example:
    >>> from torch import nn
    >>> from qatsparse.quantization import QuantConfig
    >>> restore_quantizers(nn.Sequential(nn.Linear(4, 4)), QuantConfig()).quantized
    ['0']
"""

from __future__ import annotations

import torch
from torch import nn

from qatsparse.quantization.config import QuantConfig
from qatsparse.quantization.fp16 import track_overflow
from qatsparse.quantization.modules import QuantSummary, quantize_model, quantizers

__all__ = ["restore_quantizers"]


def restore_quantizers(
    model: nn.Module, config: QuantConfig, amax: dict[str, torch.Tensor] | None = None
) -> QuantSummary:
    """Quantize ``model`` with the recorded ``config`` (idempotent on a quantized model) and load ``amax``
    (quantizer name -> amax) when given; a quantizer in ``amax`` that the model lacks is an error."""
    summary = quantize_model(model, config)
    if amax is not None:
        qs = quantizers(model)
        extra = sorted(set(amax) - set(qs))
        if extra:
            raise RuntimeError(f"QuantizationAwareTraining: quantizers in the checkpoint, not the model: {extra}")
        for name, value in amax.items():
            qs[name].load_amax(value)
    if config.precision == "fp16":
        track_overflow(model)
    return summary
