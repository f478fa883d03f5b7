"""The metrics of a validation: the user's metric specs (import paths, classes, instances, YAML dicts) turned into
fresh ``torchmetrics`` objects with their direction, the default metric of an output, and the metric objects of
one backend."""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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


class BackendMetrics:
    """The metric objects of one backend, created at its first batch (the user's specs, else each output's
    :func:`default_metric`).

    Example:
        >>> m = BackendMetrics([]); m.update([torch.eye(3)], [torch.arange(3)], ["logits"]); m.compute()
        {'top1': 1.0}
    """

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
