"""Run every backend over a validation dataloader: metrics, agreement with the reference, a gate."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qatsparse.batches import batch_inputs, batch_targets
from qatsparse.export.runners import Runner

#: Metric factories: ``(output tensor, target tensor) -> torchmetrics.Metric`` chosen per output.
MetricFactory = Callable[[torch.Tensor, torch.Tensor], Any]


def default_metric(output: torch.Tensor, target: torch.Tensor) -> tuple[str, Any] | None:
    """Top-1 accuracy for classification logits (N, C) with integer targets (N,); else None."""
    if output.dim() == 2 and output.shape[1] > 1 and target.dim() == 1 and not target.is_floating_point():
        from torchmetrics.classification import MulticlassAccuracy

        return "top1", MulticlassAccuracy(num_classes=output.shape[1], average="micro")
    return None


class _Agreement:
    """Streaming max/mean absolute error, cosine similarity and top-1 agreement of one output."""

    def __init__(self) -> None:
        self.max_abs, self.sum_abs, self.count = 0.0, 0.0, 0
        self.dot = self.n_a = self.n_b = 0.0
        self.top1_same = self.top1_n = 0

    def update(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        out, ref = out.double(), ref.double()
        diff = (out - ref).abs()
        self.max_abs = max(self.max_abs, float(diff.max()) if diff.numel() else 0.0)
        self.sum_abs += float(diff.sum())
        self.count += diff.numel()
        self.dot += float((out * ref).sum())
        self.n_a += float((out * out).sum())
        self.n_b += float((ref * ref).sum())
        if out.dim() == 2 and out.shape[1] > 1:
            self.top1_same += int((out.argmax(1) == ref.argmax(1)).sum())
            self.top1_n += out.shape[0]

    def result(self) -> dict[str, float]:
        denom = (self.n_a**0.5) * (self.n_b**0.5)
        res = {
            "max_abs_err": self.max_abs,
            "mean_abs_err": self.sum_abs / max(self.count, 1),
            "cosine": self.dot / denom if denom > 0 else float(self.n_a == self.n_b),
        }
        if self.top1_n:
            res["top1_agreement"] = self.top1_same / self.top1_n
        return res


@dataclass
class ValidationResult:
    """Metrics per backend ({backend: {metric: value}}), agreement with the reference per output,
    and per-batch latency statistics.

    Example:
        >>> ValidationResult(reference="pytorch_fp32").reference
        'pytorch_fp32'
    """

    reference: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    agreement: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: int = 0


def _metric_name(base: str, output_names: Sequence[str], i: int) -> str:
    return base if len(output_names) == 1 else f"{output_names[i]}/{base}"


@torch.no_grad()
def validate(
    runners: Sequence[Runner],
    dataloader: Iterable[Any],
    module: Any = None,
    reference: str | None = None,
    output_names: Sequence[str] | None = None,
    metric_factory: Callable[[torch.Tensor, torch.Tensor], tuple[str, Any] | None] = default_metric,
) -> ValidationResult:
    """Run each runner over the whole ``dataloader`` and compare it with the reference runner.

    Args:
        runners: backends; the first is the reference unless ``reference`` names another.
        dataloader: the validation data (batches read with :mod:`qatsparse.batches`).
        module: the LightningModule, consulted for ``batch_inputs``/``batch_targets``.
        reference: name of the reference runner.
        output_names: names of the model outputs (used to name metrics and agreement entries).
        metric_factory: picks a metric for an (output, target) pair; default top-1 accuracy.
    """
    if not runners:
        raise ValueError("validate needs at least one runner")
    names = [r.name for r in runners]
    if len(set(names)) != len(names):
        raise ValueError(f"runner names must be unique, got {names}")
    reference = reference or names[0]
    if reference not in names:
        raise ValueError(f"reference {reference!r} is not among the runners {names}")
    result = ValidationResult(reference=reference)
    metrics: dict[str, list[tuple[str, Any] | None]] = {}
    agreement: dict[str, list[_Agreement]] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    ordered = sorted(runners, key=lambda r: r.name != reference)
    for batch in dataloader:
        inputs = batch_inputs(module, batch)
        targets = batch_targets(module, batch)
        ref_out: tuple[torch.Tensor, ...] | None = None
        for r in ordered:
            t0 = time.perf_counter()
            out = r(inputs)
            times[r.name].append((time.perf_counter() - t0) * 1e3)
            if output_names is None:
                output_names = [f"output_{i}" for i in range(len(out))] if len(out) > 1 else ["output"]
            if r.name == reference:
                ref_out = out
            else:
                assert ref_out is not None
                accs = agreement.setdefault(r.name, [_Agreement() for _ in out])
                for a, o, ro in zip(accs, out, ref_out):
                    a.update(o, ro)
            if targets is not None:
                if r.name not in metrics:
                    metrics[r.name] = [metric_factory(o, t) for o, t in zip(out, targets)]
                for m, o, t in zip(metrics[r.name], out, targets):
                    if m is not None:
                        m[1].update(o, t)
        result.samples += inputs[0].shape[0]
    if result.samples == 0:
        raise ValueError("the validation dataloader is empty")
    assert output_names is not None
    for name in names:
        result.metrics[name] = {
            _metric_name(m[0], output_names, i): float(m[1].compute())
            for i, m in enumerate(metrics.get(name, []))
            if m is not None
        }
        t = times[name]
        result.latency_ms[name] = {
            "median_per_batch": statistics.median(t),
            "mean_per_batch": statistics.fmean(t),
            "batches": len(t),
        }
    for name, accs in agreement.items():
        result.agreement[name] = {output_names[i]: a.result() for i, a in enumerate(accs)}
    return result


#: Metrics where lower is better (losses, errors); everything else is "higher is better".
LOWER_IS_BETTER_HINTS = ("loss", "mse", "mae", "error", "err", "rmse", "perplexity")


def lower_is_better(metric: str) -> bool:
    """Direction of a metric from its name: losses and errors go down, accuracies go up.

    Example:
        >>> lower_is_better("value/mse"), lower_is_better("top1")
        (True, False)
    """
    leaf = metric.rsplit("/", 1)[-1].lower()
    return any(h in leaf for h in LOWER_IS_BETTER_HINTS)


def metric_drops(result: ValidationResult) -> dict[str, dict[str, float]]:
    """How much worse each backend is than the reference, per metric (positive = worse)."""
    ref = result.metrics.get(result.reference, {})
    out: dict[str, dict[str, float]] = {}
    for backend, ms in result.metrics.items():
        out[backend] = {}
        for k, v in ms.items():
            if k in ref:
                out[backend][k] = (v - ref[k]) if lower_is_better(k) else (ref[k] - v)
    return out


def gate(
    result: ValidationResult, max_metric_drop: float | Mapping[str, float], backends: Sequence[str] | None = None
) -> tuple[bool, list[str]]:
    """Check every backend's drop against ``max_metric_drop`` (absolute; one number for all metrics
    or a {metric: bound} mapping). Returns (passed, failure messages)."""
    drops = metric_drops(result)
    failures = []
    for backend, ds in drops.items():
        if backend == result.reference or (backends is not None and backend not in backends):
            continue
        for metric, drop in ds.items():
            if isinstance(max_metric_drop, Mapping):
                if metric not in max_metric_drop:
                    continue
                bound = float(max_metric_drop[metric])
            else:
                bound = float(max_metric_drop)
            if drop > bound:
                ref = result.metrics[result.reference][metric]
                val = result.metrics[backend][metric]
                failures.append(
                    f"{backend}: {metric} = {val:.4f} vs {ref:.4f} for {result.reference} "
                    f"(drop {drop:.4f} > allowed {bound:.4f})"
                )
    return not failures, failures
