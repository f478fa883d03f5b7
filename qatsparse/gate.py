"""The accuracy gate: every backend's metric drop from the reference against ``max_metric_drop``, and enforcing
the verdict of a report (raise or warn)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from qatsparse.validation_result import ValidationResult, is_higher_better, metric_drops


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
