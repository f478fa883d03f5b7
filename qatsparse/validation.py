"""Run every backend over a validation dataloader: metrics, agreement with the reference, a gate."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from qatsparse.batches import batch_inputs, batch_size, batch_targets
from qatsparse.export.runners import Runner, run
from qatsparse.gate import GateFailed, enforce_gate, gate
from qatsparse.latency import latency_summary, rotated
from qatsparse.metrics import (
    LOWER_IS_BETTER_HINTS,
    BackendMetrics,
    MetricLike,
    MetricSpec,
    default_metric,
    lower_is_better,
    metric_specs,
)
from qatsparse.progress import QUIET, Progress
from qatsparse.validation_result import ValidationResult, is_higher_better, metric_drops

__all__ = [
    "LOWER_IS_BETTER_HINTS",
    "GateFailed",
    "MetricLike",
    "MetricSpec",
    "ValidationResult",
    "default_metric",
    "enforce_gate",
    "gate",
    "is_higher_better",
    "lower_is_better",
    "metric_drops",
    "metric_specs",
    "validate",
]


class _Agreement:
    """Streaming max/mean absolute error, cosine similarity and top-1 agreement of one output."""

    def __init__(self) -> None:
        self.max_abs, self.sum_abs, self.count = 0.0, 0.0, 0
        self.dot = self.n_a = self.n_b = 0.0
        self.top1_same = self.top1_n = 0

    def update(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        out, ref = out.double(), ref.double()
        if out.shape != ref.shape:
            raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
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


@torch.no_grad()
def validate(
    runners: Sequence[Runner],
    dataloader: Iterable[Any],
    module: Any = None,
    reference: str | None = None,
    output_names: Sequence[str] | None = None,
    metrics: MetricLike | Sequence[MetricLike] | Mapping[str, Any] | None = None,
    max_batches: int | None = None,
    progress: Progress = QUIET,
) -> ValidationResult:
    """Run each runner over the whole ``dataloader`` and compare it with the reference runner.

    Batch by batch, every runner sees the same inputs, in a rotating order (so that none always runs first
    after the data loader); latency is summarised by :func:`qatsparse.latency.latency_summary` (the first
    batch is a warm-up, latency and throughput come from the same median).

    Args:
        runners: backends; the first is the reference unless ``reference`` names another.
        dataloader: the validation data (batches read with :mod:`qatsparse.batches`).
        module: the LightningModule, consulted for ``batch_inputs``/``batch_targets``.
        reference: name of the reference runner.
        output_names: names of the model outputs (name metrics and agreement entries).
        metrics: the user's metrics (see :func:`metric_specs`); default top-1 accuracy for logits with
            class targets and MSE for float targets, per output.
        max_batches: stop after this many batches (None: the whole dataloader).
        progress: shows one task per backend (see :mod:`qatsparse.progress`).

    Example:
        >>> from qatsparse.export.runners import TorchRunner
        >>> net = torch.nn.Linear(4, 3); data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> r = validate([TorchRunner(net, "a"), TorchRunner(net, "b")], data)
        >>> r.agreement["b"]["output"]["max_abs_err"]
        0.0
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
    specs: list[MetricSpec] | None = None
    per_backend: dict[str, BackendMetrics] = {}
    agreement: dict[str, list[_Agreement]] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    sizes: list[int] = []
    outputs: list[str] | None = list(output_names) if output_names else None
    total = _length(dataloader, max_batches)
    tasks = {r.name: progress.task(f"validating {r.name}", total=total) for r in runners}
    try:
        for b, batch in enumerate(dataloader):
            if max_batches is not None and b >= max_batches:
                break
            inputs = batch_inputs(module, batch)
            targets = batch_targets(module, batch)
            outs: dict[str, tuple[torch.Tensor, ...]] = {}
            for r in rotated(runners, b):
                t0 = time.perf_counter()
                outs[r.name] = run(r, inputs)
                times[r.name].append((time.perf_counter() - t0) * 1e3)
                tasks[r.name].advance()
            sizes.append(batch_size(inputs))
            for r in runners:  # metrics and agreement in the runners' own order, the reference first
                out = outs[r.name]
                if outputs is None:
                    outputs = [f"output_{i}" for i in range(len(out))] if len(out) > 1 else ["output"]
                if len(out) != len(outputs):
                    raise ValueError(f"{r.name} returned {len(out)} outputs, expected {len(outputs)} {outputs}")
                if specs is None:
                    specs = metric_specs(metrics, outputs)
                if r.name != reference:
                    accs = agreement.setdefault(r.name, [_Agreement() for _ in out])
                    for a, o, ro in zip(accs, out, outs[reference]):
                        a.update(o, ro)
                if targets is not None:
                    per_backend.setdefault(r.name, BackendMetrics(specs)).update(out, targets, outputs)
            result.samples += sizes[-1]
    finally:
        for t in tasks.values():
            t.close()
    if result.samples == 0:
        raise ValueError("the validation dataloader is empty")
    assert outputs is not None
    result.outputs = outputs
    for r in runners:
        name = r.name
        bm = per_backend.get(name)
        result.metrics[name] = bm.compute() if bm else {}
        for s, _, _ in (bm.items or []) if bm else []:
            result.metric_outputs[s.name] = s.output
            result.higher_is_better[s.name] = s.higher_is_better
        device = str(getattr(r, "device", "cpu")).split(":")[0]  # "cuda:0" -> "cuda"
        result.latency_ms[name] = latency_summary(times[name], sizes, device)
    for name, accs in agreement.items():
        result.agreement[name] = {outputs[i]: a.result() for i, a in enumerate(accs)}
    return result


def _length(dataloader: Any, max_batches: int | None) -> int | None:
    try:
        n = len(dataloader)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)
