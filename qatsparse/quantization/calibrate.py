"""Run calibration batches through a model whose quantizers collect statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qatsparse.quantization.modules import quantizers


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any]) -> int:
    """Calibrate every quantizer of ``model``: ``forward(batch)`` for each batch, then set ``amax``.

    Runs in eval mode (BatchNorm uses its running statistics, as at deployment) and restores the
    previous mode. Under DDP each quantizer's statistics are reduced across ranks, so every rank ends
    with the same ``amax``. Returns the number of batches seen.

    Example:
        >>> from qatsparse.quantization import QuantConfig, quantize_model
        >>> m = nn.Sequential(nn.Linear(4, 4)); _ = quantize_model(m, QuantConfig())
        >>> calibrate(m, [torch.randn(8, 4)], m)
        1
    """
    qs = list(quantizers(model).values())
    for q in qs:
        q.start_calibration()
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            forward(batch)
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        for q in qs:
            q._calibrator = None
        raise RuntimeError("calibration got no batches")
    for q in qs:
        q.finish_calibration()
    return n
