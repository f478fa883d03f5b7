"""Per-layer quantization sensitivity: the metric drop when only one layer is quantized."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from qatsparse.batches import as_outputs, batch_inputs, batch_targets, call_model
from qatsparse.quantization.calibrate import calibrate
from qatsparse.quantization.config import QuantConfig
from qatsparse.quantization.modules import is_quantized, layer_quantizers, quantize_model, quantized_layers, quantizers

#: ``metric(outputs, reference_outputs, targets) -> float``, higher is better; all are tuples of tensors
#: (``targets`` is None when the batches have none).
Metric = Callable[[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None], float]


def neg_mse(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], targets: Any = None) -> float:
    """Minus the mean squared difference to the FP32 outputs (0 is best): fine-grained, needs no labels."""
    return -sum(float((o.float() - r.float()).pow(2).mean()) for o, r in zip(out, ref)) / len(out)


def top1(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], targets: Any = None) -> float:
    """Top-1 accuracy of the first output against the first target."""
    if targets is None:
        raise ValueError("metric 'top1' needs batches with targets")
    return float((out[0].argmax(1) == targets[0].to(out[0].device)).float().mean())


def agreement(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], targets: Any = None) -> float:
    """Share of samples whose top-1 class equals the FP32 model's."""
    return float((out[0].argmax(1) == ref[0].argmax(1)).float().mean())


METRICS: dict[str, Metric] = {"mse": neg_mse, "top1": top1, "agreement": agreement}


@dataclass
class LayerSensitivity:
    """One layer's result: ``metric`` with only this layer quantized, ``drop`` = FP32 metric - metric.

    Example:
        >>> LayerSensitivity("fc", 0.9, 0.05).drop
        0.05
    """

    name: str
    metric: float
    drop: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return call_model(model, batch_inputs(model, batch))


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    dataloader: Iterable[Any],
    metric: str | Metric = "mse",
    config: QuantConfig | None = None,
    max_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> list[LayerSensitivity]:
    """Rank the quantizable layers of ``model`` by how much quantizing only that layer costs.

    If ``model`` holds no quantizers, a copy is quantized with ``config`` (default INT8, max) and
    calibrated on the same batches; otherwise ``model`` is used as it is (its quantizers' on/off
    states are restored afterwards). The FP32 metric is measured with every quantizer off; then each
    quantized layer in turn has its own (input, weight, attention) quantizers on. Residual quantizers stay off
    (they are not ranked).

    Args:
        model: the model (eval mode is used and restored).
        dataloader: batches in the ``(inputs, targets)`` layout (see :mod:`qatsparse.batches`);
            they are held in memory.
        metric: ``"mse"`` (minus the MSE to the FP32 outputs; default), ``"top1"``, ``"agreement"``
            or a function ``metric(outputs, fp32_outputs, targets) -> float`` (higher is better),
            averaged over batches weighted by batch size.
        config: quantization used when ``model`` is not quantized yet.
        max_batches: use at most this many batches.
        forward: ``forward(model, batch) -> outputs`` (default: the model on the batch's inputs).

    Returns:
        One entry per layer, the largest drop first.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [r.name for r in sensitivity(m, [(torch.randn(16, 4), torch.zeros(16))])]  # doctest: +SKIP
        ['2', '0']
    """
    fn = METRICS.get(metric) if isinstance(metric, str) else metric
    if fn is None:
        raise ValueError(f"metric must be one of {sorted(METRICS)} or a callable, got {metric!r}")
    fwd = forward or _default_forward
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = []
    for i, b in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        batches.append(b)
    if not batches:
        raise ValueError("sensitivity got no batches")
    work = model
    if not is_quantized(model):
        work = copy.deepcopy(model)
        quantize_model(work, config or QuantConfig())
        calibrate(work, batches, lambda b: fwd(work, _to(b, device)))
    qs = quantizers(work)
    saved = {n: q.enabled for n, q in qs.items()}
    layers = {n: [f"{n}.{q}" if n else q for q in layer_quantizers(m)] for n, m in quantized_layers(work).items()}
    was_training = work.training
    work.eval()
    try:
        for q in qs.values():
            q.enabled = False
        refs = [as_outputs(fwd(work, _to(b, device))) for b in batches]

        def score() -> float:
            total, weight = 0.0, 0
            for b, ref in zip(batches, refs):
                b = _to(b, device)
                out = as_outputs(fwd(work, b))
                n = len(ref[0])
                total += n * float(fn(out, ref, batch_targets(work, b)))
                weight += n
            return total / weight

        base = score()
        rows = []
        for name, own in layers.items():
            for q in own:
                qs[q].enabled = True
            value = score()
            for q in own:
                qs[q].enabled = False
            rows.append(LayerSensitivity(name, value, base - value))
    finally:
        for n, q in qs.items():
            q.enabled = saved[n]
        work.train(was_training)
    return sorted(rows, key=lambda r: (-r.drop, r.name))


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def format_sensitivity(rows: list[LayerSensitivity], kept: Iterable[str] = ()) -> str:
    """A text table of sensitivity results (rich), marking the layers ``kept`` in higher precision.

    Example:
        >>> print(format_sensitivity([LayerSensitivity("fc", -0.1, 0.1)], kept=["fc"]))  # doctest: +SKIP
    """
    from rich.console import Console
    from rich.table import Table

    kept = set(kept)
    table = Table(title="quantization sensitivity (only this layer quantized)")
    for col in ("rank", "layer", "metric", "drop", "kept in higher precision"):
        table.add_column(col, justify="right" if col in ("rank", "metric", "drop") else "left")
    for i, r in enumerate(rows, 1):
        table.add_row(str(i), r.name, f"{r.metric:.6g}", f"{r.drop:.6g}", "yes" if r.name in kept else "")
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None).print(table)
    return buf.getvalue().rstrip()
