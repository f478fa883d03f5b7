"""What qatsparse tells the Trainer's loggers (CSV, TensorBoard, W&B, ...), every name under ``qatsparse/``.

* ``qatsparse/sparsity/...`` -- :func:`qatsparse.sparsity.sparsity_metrics` (logged at every training epoch end);
* ``qatsparse/quantization/...`` -- :func:`quantization_metrics` (epoch ends after QAT started; the calibrator
  and precision, which are words, go to the loggers' hyperparameters);
* ``qatsparse/report/...`` -- :func:`report_metrics` at the end of fit: each backend's metrics, drop, agreement,
  latency, 2:4 share, and ``qatsparse/report/passed``.

Metrics logged when ``fit`` ends cannot go through ``LightningModule.log`` (Lightning refuses it in
``on_fit_end``), so :func:`log_to_loggers` calls the loggers' own API and saves them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PREFIX = "qatsparse/"


def quantization_metrics(qreport: Mapping[str, Any], prefix: str = PREFIX + "quantization/") -> dict[str, float]:
    """Numbers of the QAT callback's ``report()``: layers quantized, kept in higher precision, residual
    quantizers, layers flagged for FP16 overflow, and one ``fp16_overflow/<layer>`` flag (1.0) per flagged layer.

    Example:
        >>> quantization_metrics({"quantized": ["a", "b"], "skipped": {"fc": "excluded"}, "fp16_overflow": {"a": 7e4}})
        ... # doctest: +NORMALIZE_WHITESPACE
        {'qatsparse/quantization/quantized_layers': 2.0, 'qatsparse/quantization/higher_precision_layers': 1.0,
         'qatsparse/quantization/residual_quantizers': 0.0, 'qatsparse/quantization/fp16_overflow_layers': 1.0,
         'qatsparse/quantization/fp16_overflow/a': 1.0}
    """
    overflow = dict(qreport.get("fp16_overflow") or {})
    out = {
        f"{prefix}quantized_layers": float(len(qreport.get("quantized") or [])),
        f"{prefix}higher_precision_layers": float(len(qreport.get("skipped") or {})),
        f"{prefix}residual_quantizers": float(len(qreport.get("residual_quantizers") or {})),
        f"{prefix}fp16_overflow_layers": float(len(overflow)),
    }
    out.update({f"{prefix}fp16_overflow/{name}": 1.0 for name in overflow})
    return out


def quantization_hparams(qreport: Mapping[str, Any], prefix: str = PREFIX + "quantization/") -> dict[str, Any]:
    """The words of the quantization settings (precision, calibrator), for the loggers' hyperparameters.

    Example:
        >>> quantization_hparams({"precision": "int8", "calibrator": "entropy", "quantized": []})
        {'qatsparse/quantization/precision': 'int8', 'qatsparse/quantization/calibrator': 'entropy'}
    """
    return {f"{prefix}{k}": qreport[k] for k in ("precision", "calibrator") if qreport.get(k) is not None}


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def report_metrics(report: Mapping[str, Any], prefix: str = PREFIX + "report/") -> dict[str, float]:
    """The report as flat numbers: ``<backend>/<metric>``, ``<backend>/drop/<metric>``,
    ``<backend>/agreement/<output>/<measure>``, ``<backend>/latency_ms`` (median per batch),
    ``<backend>/throughput_per_s`` (from the same median), ``<backend>/weights_2to4_share`` and ``passed``.

    Example:
        >>> a = {"metrics": {"top1": 0.9}, "latency_ms": {"median_per_batch": 2.0, "throughput_per_s": 16e3}}
        >>> r = {"reference": "a", "passed": True, "agreement": {}, "backends": {"a": a}}
        >>> report_metrics(r)["qatsparse/report/a/top1"], report_metrics(r)["qatsparse/report/passed"]
        (0.9, 1.0)
    """
    out: dict[str, float] = {f"{prefix}passed": float(bool(report.get("passed")))}
    ref = report.get("reference")
    for name, b in (report.get("backends") or {}).items():
        for metric, v in (b.get("metrics") or {}).items():
            out[f"{prefix}{name}/{metric}"] = float(v)
        if name != ref:
            for metric, v in (b.get("drop_vs_reference") or {}).items():
                out[f"{prefix}{name}/drop/{metric}"] = float(v)
        lat = b.get("latency_ms") or {}
        for key, as_name in (("median_per_batch", "latency_ms"), ("throughput_per_s", "throughput_per_s")):
            if (v := _num(lat.get(key))) is not None:
                out[f"{prefix}{name}/{as_name}"] = v
        if (v := _num((b.get("sparsity") or {}).get("weights_2to4_share"))) is not None:
            out[f"{prefix}{name}/weights_2to4_share"] = v
    for name, per_output in (report.get("agreement") or {}).items():
        for output, measures in per_output.items():
            for measure, v in measures.items():
                if (x := _num(v)) is not None:
                    out[f"{prefix}{name}/agreement/{output}/{measure}"] = x
    return out


def log_to_loggers(trainer: Any, metrics: Mapping[str, float], hparams: Mapping[str, Any] | None = None) -> None:
    """Log ``metrics`` (at the current global step) and ``hparams`` to every logger of ``trainer`` and save them.

    For hooks where ``LightningModule.log`` is not allowed (``on_fit_end``); loggers are rank-zero only.

    Example:
        >>> log_to_loggers(None, {"qatsparse/report/passed": 1.0})  # no trainer: nothing to do
    """
    if trainer is None or not getattr(trainer, "is_global_zero", True):
        return
    for logger in getattr(trainer, "loggers", []):
        if hparams:
            logger.log_hyperparams(dict(hparams))
        if metrics:
            logger.log_metrics(dict(metrics), step=trainer.global_step)
        logger.save()
