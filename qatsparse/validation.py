"""Run every backend over a validation dataloader: metrics, agreement with the reference, a gate."""

from __future__ import annotations

import copy
import importlib
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from qatsparse.batches import batch_inputs, batch_size, batch_targets
from qatsparse.export.runners import Runner, run
from qatsparse.latency import latency_summary, rotated
from qatsparse.progress import QUIET, Progress

#: A metric as users give it: an import path (``"torchmetrics.MeanSquaredError"``), a Metric class or
#: instance, or ``{"class_path": ..., "init_args": {...}}`` (the LightningCLI/YAML form).
MetricLike = Any


@dataclass
class MetricSpec:
    """One metric on one output: how to make a fresh ``torchmetrics.Metric`` and which way is better.

    Example:
        >>> s = metric_specs("torchmetrics.MeanSquaredError", ["value"])[0]
        >>> s.name, s.output, s.higher_is_better
        ('mean_squared_error', 'value', False)
    """

    name: str
    output: str
    factory: Callable[[], Any]
    higher_is_better: bool


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _import(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    if not module:
        raise ValueError(f"metric {path!r} is not an import path like 'torchmetrics.MeanSquaredError'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import metric {path!r}: {e}") from e


#: Metrics where lower is better (losses, errors) when a metric does not say (``higher_is_better``).
LOWER_IS_BETTER_HINTS = ("loss", "mse", "mae", "error", "err", "rmse", "perplexity")


def lower_is_better(metric: str) -> bool:
    """Direction of a metric from its name: losses and errors go down, accuracies go up.

    Example:
        >>> lower_is_better("value/mse"), lower_is_better("top1")
        (True, False)
    """
    leaf = metric.rsplit("/", 1)[-1].lower()
    return any(h in leaf for h in LOWER_IS_BETTER_HINTS)


def _one_spec(spec: MetricLike, output: str, name: str | None) -> MetricSpec:
    from torchmetrics import Metric

    init: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        if "class_path" not in spec:
            raise ValueError(f"a metric given as a mapping needs 'class_path' (and optional 'init_args'), got {spec}")
        init = dict(spec.get("init_args") or {})
        name = name or spec.get("name")
        spec = spec["class_path"]
    if isinstance(spec, str):
        spec = _import(spec)
    if isinstance(spec, Metric):
        instance = spec

        def factory() -> Any:
            m = copy.deepcopy(instance)
            m.reset()
            return m

        cls = type(spec)
    elif isinstance(spec, type) and issubclass(spec, Metric):
        cls = spec

        def factory() -> Any:
            return cls(**init)

        factory()  # fail now, with the bad arguments named, rather than after validation has started
    else:
        raise ValueError(
            f"metric {spec!r} is not a torchmetrics Metric class, instance, import path or "
            "{'class_path': ..., 'init_args': ...} mapping"
        )
    metric_name = name or _snake(cls.__name__)
    hib = getattr(cls, "higher_is_better", None)
    return MetricSpec(metric_name, output, factory, (not lower_is_better(metric_name)) if hib is None else bool(hib))


def metric_specs(metrics: MetricLike | Sequence[MetricLike] | Mapping[str, Any] | None, outputs: Sequence[str]):
    """Resolve the user's metric configuration against the model's output names.

    Forms: one metric or a list of metrics (single-output models); ``{output: metric or [metrics]}``;
    a list of ``{"output": ..., "metric": ..., "name": ...}`` entries. ``None`` returns ``[]`` (defaults
    are chosen per output at the first batch, see :func:`default_metric`).

    Raises:
        ValueError: an unknown output, a metric that cannot be imported or built, or an unnamed metric on
            a multi-output model.

    Example:
        >>> [s.name for s in metric_specs({"value": "torchmetrics.MeanSquaredError"}, ["policy", "value"])]
        ['value/mean_squared_error']
    """
    if metrics is None:
        return []
    outputs = list(outputs)
    entries: list[tuple[str | None, MetricLike, str | None]] = []
    if isinstance(metrics, Mapping) and "class_path" not in metrics:
        for out, ms in metrics.items():
            for m in ms if isinstance(ms, (list, tuple)) else [ms]:
                entries.append((str(out), m, None))
    else:
        for m in metrics if isinstance(metrics, (list, tuple)) else [metrics]:
            if isinstance(m, Mapping) and "metric" in m:
                entries.append((m.get("output"), m["metric"], m.get("name")))
            else:
                entries.append((None, m, None))
    specs = []
    for out, m, name in entries:
        if out is None:
            if len(outputs) != 1:
                raise ValueError(
                    f"the model has {len(outputs)} outputs {outputs}: name the output of each metric, "
                    "e.g. metrics={'value': 'torchmetrics.MeanSquaredError'}"
                )
            out = outputs[0]
        if out not in outputs:
            raise ValueError(f"metric {m!r} names output {out!r}; the outputs are {outputs}")
        s = _one_spec(m, out, name)
        if len(outputs) > 1:
            s.name = f"{out}/{s.name}"
        specs.append(s)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"metric names must be unique, got {names} (give entries a 'name')")
    return specs


def default_metric(output: torch.Tensor, target: torch.Tensor) -> tuple[str, Any] | None:
    """Top-1 accuracy for classification logits (N, C) with integer targets (N,); mean squared error for a
    float target with as many values as the output; else None.

    Example:
        >>> default_metric(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))[0]
        'top1'
    """
    if output.dim() == 2 and output.shape[1] > 1 and target.dim() == 1 and not target.is_floating_point():
        from torchmetrics.classification import MulticlassAccuracy

        return "top1", MulticlassAccuracy(num_classes=output.shape[1], average="micro")
    if target.is_floating_point() and target.numel() == output.numel():
        from torchmetrics import MeanSquaredError

        return "mse", MeanSquaredError()
    return None


def _update(metric: Any, out: torch.Tensor, target: torch.Tensor) -> None:
    if out.shape != target.shape and out.numel() == target.numel() and target.is_floating_point():
        out = out.reshape(target.shape)  # (N, 1) value head vs (N,) targets
    metric.update(out, target)


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


class _BackendMetrics:
    """The metric objects of one backend, created at its first batch."""

    def __init__(self, specs: Sequence[MetricSpec]) -> None:
        self.specs = list(specs)
        self.items: list[tuple[MetricSpec, int, Any]] | None = None

    def update(self, outs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], outputs: list[str]) -> None:
        if self.items is None:
            self.items = []
            if self.specs:
                for s in self.specs:
                    i = outputs.index(s.output)
                    if i >= len(targets):
                        raise ValueError(
                            f"metric {s.name!r} is on output {s.output!r} (#{i}) but batches carry "
                            f"{len(targets)} target(s); define `batch_targets(batch)` on the LightningModule"
                        )
                    self.items.append((s, i, s.factory()))
            else:
                for i, (o, t) in enumerate(zip(outs, targets)):
                    d = default_metric(o, t)
                    if d is not None:
                        name = d[0] if len(outputs) == 1 else f"{outputs[i]}/{d[0]}"
                        spec = MetricSpec(name, outputs[i], lambda: None, d[0] == "top1")
                        self.items.append((spec, i, d[1]))
        for _, i, m in self.items:
            _update(m, outs[i], targets[i])

    def compute(self) -> dict[str, float]:
        for _, _, m in self.items or []:
            # The validation runs in one process (rank 0 at the end of a DDP/FSDP fit): torchmetrics must not wait
            # for the other ranks to gather their states (they have none, and are not calling).
            if hasattr(m, "sync_on_compute"):
                m.sync_on_compute = m._to_sync = False
        return {s.name: float(m.compute()) for s, _, m in self.items or []}


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
    per_backend: dict[str, _BackendMetrics] = {}
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
                    per_backend.setdefault(r.name, _BackendMetrics(specs)).update(out, targets, outputs)
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


def gate(
    result: ValidationResult, max_metric_drop: float | Mapping[str, float], backends: Sequence[str] | None = None
) -> tuple[bool, list[str]]:
    """Check every backend's drop against ``max_metric_drop`` (absolute; one number for all metrics
    or a {metric: bound} mapping). Returns (passed, failure messages naming the numbers).

    A bound for a metric that was not computed is a failure too (a misspelt name must not pass silently),
    and so is a gate with no metric at all (e.g. validation batches without targets): nothing was checked.

    Example:
        >>> r = ValidationResult("ref", metrics={"ref": {"top1": 0.9}, "int8": {"top1": 0.85}})
        >>> gate(r, 0.01)[0], gate(r, 0.1)[0]
        (False, True)
    """
    drops = metric_drops(result)
    failures = []
    known = set(result.metrics.get(result.reference, {}))
    if not known:
        failures.append(
            f"no metric was computed for {result.reference} (do the validation batches carry targets? see "
            "qatsparse.batches): the accuracy gate checked nothing"
        )
    if isinstance(max_metric_drop, Mapping):
        for m in max_metric_drop:
            if m not in known:
                failures.append(
                    f"max_metric_drop names metric {m!r}, which was not computed (metrics: {sorted(known)})"
                )
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
                better = "higher" if is_higher_better(result, metric) else "lower"
                failures.append(
                    f"{backend}: {metric} = {val:.4f} vs {ref:.4f} for {result.reference} "
                    f"({better} is better; drop {drop:.4f} > allowed {bound:.4f})"
                )
    return not failures, failures


class GateFailed(RuntimeError):
    """The accuracy gate failed: a backend lost more than ``max_metric_drop`` on some metric."""


def enforce_gate(report: Mapping[str, Any], on_fail: Literal["raise", "warn"] = "raise") -> None:
    """Raise :class:`GateFailed` (``on_fail="raise"``) or warn when ``report`` did not pass.

    Example:
        >>> enforce_gate({"passed": True, "gate": {"failures": []}})
    """
    if on_fail not in ("raise", "warn"):
        raise ValueError(f"on_fail must be 'raise' or 'warn', got {on_fail!r}")
    failures = list(report.get("gate", {}).get("failures", []))
    if report.get("passed", not failures):
        return
    where = report.get("artifacts", {}).get("report.json")
    msg = "qatsparse accuracy gate failed:\n  " + "\n  ".join(failures) + (f"\n(report: {where})" if where else "")
    if on_fail == "raise":
        raise GateFailed(msg)
    warnings.warn(msg, stacklevel=2)
