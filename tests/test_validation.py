"""Validation: user metrics (import paths, YAML), directions, the gate on constructed cases."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from qatsparse.export.runners import TorchRunner
from qatsparse.validation import (
    GateFailed,
    ValidationResult,
    enforce_gate,
    gate,
    metric_drops,
    metric_specs,
    validate,
)
from tests.test_export_nets import board_loader, trained_board_net


def _result(ref: dict, other: dict, hib: dict | None = None) -> ValidationResult:
    return ValidationResult(
        "pytorch_fp32", metrics={"pytorch_fp32": ref, "onnxruntime": other}, higher_is_better=hib or {}
    )


def test_gate_on_accuracy_passes_and_fails():
    r = _result({"top1": 0.950}, {"top1": 0.945})
    assert gate(r, 0.01) == (True, [])
    passed, failures = gate(r, 0.001)
    assert not passed and "top1 = 0.9450 vs 0.9500" in failures[0] and "drop 0.0050 > allowed 0.0010" in failures[0]
    assert gate(_result({"top1": 0.9}, {"top1": 0.95}), 0.0)[0]  # better than the reference is never a drop


def test_gate_on_a_loss_knows_lower_is_better():
    r = _result({"value/mse": 0.10}, {"value/mse": 0.13}, {"value/mse": False})
    assert metric_drops(r)["onnxruntime"]["value/mse"] == pytest.approx(0.03)
    assert gate(r, {"value/mse": 0.05})[0]
    passed, failures = gate(r, {"value/mse": 0.02})
    assert not passed and "lower is better" in failures[0]
    assert gate(_result({"value/mse": 0.10}, {"value/mse": 0.01}, {"value/mse": False}), 0.0)[0]  # improved


def test_gate_reports_a_bound_for_an_unknown_metric():
    passed, failures = gate(_result({"top1": 0.9}, {"top1": 0.9}), {"top_1": 0.01})
    assert not passed and "'top_1'" in failures[0] and "top1" in failures[0]


def test_enforce_gate_raise_and_warn():
    report = {"passed": False, "gate": {"failures": ["onnxruntime: top1 = 0.5 vs 0.9"]}}
    with pytest.raises(GateFailed, match=r"top1 = 0\.5 vs 0\.9"):
        enforce_gate(report, "raise")
    with pytest.warns(UserWarning, match=r"top1 = 0\.5"):
        enforce_gate(report, "warn")
    with pytest.raises(ValueError, match="on_fail"):
        enforce_gate(report, "ignore")  # type: ignore[arg-type]


def test_metric_specs_forms_and_errors():
    specs = metric_specs(
        {"policy": {"class_path": "torchmetrics.classification.MulticlassAccuracy", "init_args": {"num_classes": 64}},
         "value": ["torchmetrics.MeanSquaredError", "torchmetrics.MeanAbsoluteError"]},
        ["policy", "value"],
    )  # fmt: skip
    assert [(s.name, s.higher_is_better) for s in specs] == [
        ("policy/multiclass_accuracy", True),
        ("value/mean_squared_error", False),
        ("value/mean_absolute_error", False),
    ]
    with pytest.raises(ValueError, match="name the output"):
        metric_specs("torchmetrics.MeanSquaredError", ["policy", "value"])
    with pytest.raises(ValueError, match=r"cannot import metric 'torchmetrics\.NoSuchMetric'"):
        metric_specs("torchmetrics.NoSuchMetric", ["out"])
    with pytest.raises(ValueError, match="names output 'values'"):
        metric_specs({"values": "torchmetrics.MeanSquaredError"}, ["policy", "value"])


def test_two_output_model_with_metrics_from_yaml_import_paths():
    """A YAML recipe's metrics (import paths) drive validation of a two-output model; values are exact."""
    recipe = yaml.safe_load(
        """
        class_path: qatsparse.TensorRTExport
        init_args:
          dirpath: unused
          metrics:
            value: torchmetrics.MeanSquaredError
            policy:
              class_path: torchmetrics.classification.MulticlassAccuracy
              init_args: {num_classes: 64, average: micro}
        """
    )
    from qatsparse import TensorRTExport

    cb = TensorRTExport(**recipe["init_args"])
    net = trained_board_net(steps=6)
    noisy = trained_board_net(steps=6)
    with torch.no_grad():
        noisy.value_fc2.bias.add_(0.3)  # a backend whose value head is off by a known amount
    loader = board_loader(64, 32)
    r = validate(
        [TorchRunner(net, "pytorch_fp32"), TorchRunner(noisy, "onnxruntime")],
        loader,
        output_names=["policy", "value"],
        metrics=cb.settings.metrics,
    )
    assert set(r.metrics["pytorch_fp32"]) == {"policy/multiclass_accuracy", "value/mean_squared_error"}
    (planes, side), (move, value) = next(iter(board_loader(64, 64)))
    with torch.no_grad():
        p, v = net(planes, side)
    assert r.metrics["pytorch_fp32"]["policy/multiclass_accuracy"] == pytest.approx(
        float((p.argmax(1) == move).float().mean())
    )
    assert r.metrics["pytorch_fp32"]["value/mean_squared_error"] == pytest.approx(
        float(((v.squeeze(1) - value) ** 2).mean()), rel=1e-5
    )
    assert r.metric_outputs == {"policy/multiclass_accuracy": "policy", "value/mean_squared_error": "value"}
    assert r.higher_is_better == {"policy/multiclass_accuracy": True, "value/mean_squared_error": False}
    assert set(r.agreement["onnxruntime"]) == {"policy", "value"}
    assert r.agreement["onnxruntime"]["policy"]["max_abs_err"] == 0.0
    assert r.agreement["onnxruntime"]["value"]["max_abs_err"] > 0.01
    assert r.agreement["onnxruntime"]["policy"]["top1_agreement"] == 1.0
    passed, failures = gate(r, {"value/mean_squared_error": 1e-4})
    assert not passed and failures[0].startswith("onnxruntime: value/mean_squared_error")


def test_default_metrics_top1_and_mse_per_output():
    net = trained_board_net(steps=3)
    r = validate([TorchRunner(net, "a")], board_loader(32, 16), output_names=["policy", "value"])
    assert set(r.metrics["a"]) == {"policy/top1", "value/mse"}
    assert r.latency_ms["a"]["batches"] == 1 and r.latency_ms["a"]["warmup_batches"] == 1 and r.samples == 32


def test_validate_input_errors():
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="unique"):
        validate([TorchRunner(net, "a"), TorchRunner(net, "a")], [])
    with pytest.raises(ValueError, match="empty"):
        validate([TorchRunner(net, "a")], [])


def test_gate_fails_when_no_metric_was_computed():
    from qatsparse.validation import ValidationResult, gate

    passed, failures = gate(ValidationResult("pytorch_fp32", metrics={"pytorch_fp32": {}, "onnxruntime": {}}), 0.01)
    assert not passed
    assert "checked nothing" in failures[0]


class _Clock:
    """A simulated time.perf_counter: runners advance it by what they 'cost'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Costly:
    """A runner that costs ``ms`` per call, +``first_ms`` on its very first call, +``cold_ms`` when it is the first
    backend to touch a new batch (cold caches after the data loader)."""

    def __init__(self, name: str, clock: _Clock, batches: list, ms: float, first_ms: float = 0.0, cold_ms: float = 0.0):
        self.name, self.precision, self.clock, self.batches = name, "fp32", clock, batches
        self.ms, self.first_ms, self.cold_ms, self.calls = ms, first_ms, cold_ms, 0

    def __call__(self, inputs):
        cost = self.ms + (self.first_ms if self.calls == 0 else 0.0)
        if self.batches and self.batches[-1] is not None:  # first runner on this batch
            cost += self.cold_ms
            self.batches[-1] = None
        self.calls += 1
        self.clock.now += cost / 1e3
        return (inputs[0][:, :3],)


def test_latency_is_one_median_after_warmup_and_not_charged_to_the_first_backend(monkeypatch):
    import qatsparse.validation as validation

    clock, seen = _Clock(), []
    monkeypatch.setattr(validation.time, "perf_counter", clock)

    def loader():
        for i in range(10):
            seen.append(i)  # a new batch: the next runner pays the cold cost
            n = 16 if i < 9 else 5
            yield (torch.randn(n, 4), torch.randint(0, 3, (n,)))

    a = _Costly("a", clock, seen, ms=10.0, first_ms=500.0, cold_ms=4.0)
    b = _Costly("b", clock, seen, ms=10.0, first_ms=500.0, cold_ms=4.0)
    r = validate([a, b], loader())
    la, lb = r.latency_ms["a"], r.latency_ms["b"]
    assert la["warmup_batches"] == 1 and la["batch_size"] == 16 and la["batches"] == 8  # the batch of 5 not mixed in
    # each runs first after the data loader on half the batches: neither is charged for it more than the other
    assert la["median_per_batch"] == pytest.approx(12.0) and lb["median_per_batch"] == pytest.approx(12.0)
    for lat in (la, lb):  # throughput is the same median's, so both columns rank backends alike
        assert lat["throughput_per_s"] == pytest.approx(16 * 1e3 / lat["median_per_batch"])
        assert lat["indicative"] is True and lat["statistic"] == "median"
