"""FP16 overflow detection: which layers see or produce values an FP16 engine cannot hold.

In ``precision="fp16"`` every quantized Conv/Linear records, on the device and without a GPU sync,
the largest ``|x|`` of its input (before rounding) and output, inf/NaN counting as infinite -- when
its input is finite: a layer fed inf/NaN did not cause it (the layer upstream that did is flagged,
and once it is kept in FP32 the values downstream are finite again). :func:`overflowing_layers`
reads these peaks (one sync), reduces them across DDP ranks and names every layer whose peak is
beyond :data:`FP16_MAX` or not finite, or whose weights are. The QAT callback keeps those layers in
FP32 (no FP16 rounding from then on, and ``keep_fp32`` in its report for the FP16 ONNX export).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

#: Largest finite float16 value.
FP16_MAX = float(torch.finfo(torch.float16).max)


@torch.no_grad()
def record_peak(layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """Fold ``max(|x|, |out|)`` (inf for inf/NaN; 0 when ``x`` is not finite) into ``layer._overflow_peak``."""
    x_peak = x.detach().abs().amax().float()
    both = torch.nan_to_num(
        torch.maximum(x_peak, out.detach().abs().amax().float()), nan=float("inf"), posinf=float("inf")
    )
    peak = torch.where(torch.isfinite(x_peak), both, torch.zeros_like(both))
    prev = getattr(layer, "_overflow_peak", None)
    layer._overflow_peak = peak if prev is None else torch.maximum(prev, peak)


def _fp16_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if getattr(m, "input_quantizer", None) is not None and m.input_quantizer.precision == "fp16"
    }


def track_overflow(model: nn.Module, enabled: bool = True) -> list[str]:
    """Start (or stop) recording activation peaks in every FP16-quantized layer; resets the peaks.

    Returns the names of the tracked layers.

    Example:
        >>> from qatsparse.quantization import QuantConfig, quantize_model
        >>> m = nn.Sequential(nn.Linear(4, 4)); _ = quantize_model(m, QuantConfig(precision="fp16"))
        >>> track_overflow(m)
        ['0']
    """
    layers = _fp16_layers(model)
    for m in layers.values():
        m._track_overflow = enabled
        m._overflow_peak = None
    return list(layers)


@torch.no_grad()
def overflowing_layers(model: nn.Module, reduce: bool = True) -> dict[str, float]:
    """``{layer name: peak |value|}`` of the FP16 layers beyond the FP16 range (``inf`` for inf/NaN).

    Looks at the recorded activation peaks (see :func:`track_overflow`) and at the weights. Under DDP
    the peaks are reduced (max) across ranks, so every rank flags the same layers (every rank must
    call this).

    Example:
        >>> from qatsparse.quantization import QuantConfig, quantize_model
        >>> m = nn.Sequential(nn.Linear(1, 1)); _ = quantize_model(m, QuantConfig(precision="fp16"))
        >>> _ = track_overflow(m); _ = m(torch.full((1, 1), 1e5)); overflowing_layers(m)  # 1e5 -> inf in FP16
        {'0': inf}
    """
    layers = _fp16_layers(model)
    if not layers:
        return {}
    peaks = []
    for m in layers.values():
        weights = [getattr(m, n) for n in m.weight_quantizers()] if hasattr(m, "weight_quantizers") else [m.weight]
        p = torch.stack([w.detach().abs().amax().float() for w in weights]).amax()
        act = getattr(m, "_overflow_peak", None)
        if act is not None:
            p = torch.maximum(p, act.to(p.device))
        peaks.append(p)
    t = torch.nan_to_num(torch.stack(peaks), nan=float("inf"), posinf=float("inf"))
    if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    values = t.cpu().tolist()
    return {n: v for n, v in zip(layers, values) if not v <= FP16_MAX}


def run_fp16_range_check(model: nn.Module, batches: Callable[[], Iterable[Any]], forward: Callable[[Any], Any]) -> None:
    """Start overflow tracking and run ``forward`` on every batch of ``batches()`` in eval mode without
    gradients (the model's train/eval mode restored afterwards); :func:`overflowing_layers` then names the
    layers outside the FP16 range.

    Example:
        >>> from qatsparse.quantization import QuantConfig, quantize_model
        >>> m = nn.Sequential(nn.Linear(1, 1)); _ = quantize_model(m, QuantConfig(precision="fp16"))
        >>> run_fp16_range_check(m, lambda: [torch.full((1, 1), 1e5)], m); overflowing_layers(m)
        {'0': inf}
    """
    track_overflow(model)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches():
                forward(b)
    finally:
        model.train(was)
