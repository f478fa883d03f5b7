"""A validation's result (metrics, agreement and latency per backend) and what is read from it: each metric's
direction and each backend's drop from the reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qatsparse.metrics import lower_is_better


@dataclass
class ValidationResult:
    """Metrics per backend ({backend: {metric: value}}), agreement with the reference per output,
    per-batch latency (:func:`qatsparse.latency.latency_summary`), and what each metric measures.

    Example:
        >>> ValidationResult(reference="pytorch_fp32").reference
        'pytorch_fp32'
    """

    reference: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    agreement: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: int = 0
    outputs: list[str] = field(default_factory=list)
    metric_outputs: dict[str, str] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)


def is_higher_better(result: ValidationResult, metric: str) -> bool:
    """Direction of ``metric`` in ``result`` (from the metric itself, else from its name)."""
    return result.higher_is_better.get(metric, not lower_is_better(metric))


def metric_drops(result: ValidationResult) -> dict[str, dict[str, float]]:
    """How much worse each backend is than the reference, per metric (positive = worse).

    Example:
        >>> r = ValidationResult("ref", metrics={"ref": {"top1": 0.9, "mse": 0.1}, "b": {"top1": 0.8, "mse": 0.3}})
        >>> {k: round(v, 3) for k, v in metric_drops(r)["b"].items()}
        {'top1': 0.1, 'mse': 0.2}
    """
    ref = result.metrics.get(result.reference, {})
    out: dict[str, dict[str, float]] = {}
    for backend, ms in result.metrics.items():
        out[backend] = {}
        for k, v in ms.items():
            if k in ref:
                out[backend][k] = (ref[k] - v) if is_higher_better(result, k) else (v - ref[k])
    return out
