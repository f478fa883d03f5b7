"""TensorRTExport in a real fit: artifacts, lint findings and report at fit end; the gate raises or warns."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from qatsparse import QuantizationAwareTraining, TensorRTExport
from qatsparse.validation import GateFailed
from tests.test_export_nets import BoardNet, board_loader


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Diverging(BoardNet):
    """Trains away from its targets: the final model is worse than the reference, so a gate fails for real."""

    def training_step(self, batch, batch_idx):
        return -super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(tmp_path, model=None, **export_kwargs):
    torch.manual_seed(0)
    cb = TensorRTExport(dirpath=tmp_path, output_names=["policy", "value"], **export_kwargs)
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        callbacks=[QuantizationAwareTraining(precision="int8", calib_batches=2, start_step=3, verbose=False), cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model or BoardNet(), board_loader(64, 16), board_loader(48, 16))
    return cb


def test_fit_end_writes_artifacts_and_report(tmp_path):
    cb = _fit(tmp_path, metrics={"value": "torchmetrics.MeanAbsoluteError"}, max_metric_drop=1.0)
    for name in ("model_fp32.onnx", "model.onnx", "report.json", "report.md", "report.png"):
        assert (tmp_path / name).exists(), name
    assert not (tmp_path / "model.plan").exists()  # no TensorRT here: nothing pretends to be an engine
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and cb.report["passed"]
    assert set(report["backends"]["onnxruntime"]["metrics"]) == {"value/mean_absolute_error"}
    assert report["quantization"]["precision"] == "int8" and report["quantization"]["applied"]
    assert report["samples"] == 48 and "lint" in report


def test_gate_failure_raises_after_writing_the_report(tmp_path):
    with pytest.raises(GateFailed, match=r"value/mse = .* drop .* > allowed 0.0000") as e:
        _fit(tmp_path, Diverging(), max_metric_drop={"value/mse": 0.0})
    assert f"The trained model is saved in {tmp_path / 'model.ckpt'}" in str(e.value)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False
    assert report["backends"]["pytorch_qat"]["drop_vs_reference"]["value/mse"] > 0


def test_gate_failure_warns_with_on_fail_warn(tmp_path):
    with pytest.warns(UserWarning, match="accuracy gate failed"):
        _fit(tmp_path, max_metric_drop={"nope": 0.1}, on_fail="warn")


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="build_engine"):
        TensorRTExport(build_engine="yes")
    with pytest.raises(ValueError, match="cannot import metric"):
        TensorRTExport(metrics={"value": "torchmetrics.NoSuchMetric"})
