"""TensorRTExport in a real fit: artifacts, lint findings and report at fit end; the gate raises or warns."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
from qatsparse.validation import GateFailed
from tests.test_export_nets import BoardNet, board_loader

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Diverging(BoardNet):
    """Trains away from its targets: the final model is worse than the reference, so a gate fails for real."""

    def training_step(self, batch, batch_idx):
        return -super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(tmp_path, trainer_kwargs=None, sparsity=False, extra_callbacks=(), model=None, **export_kwargs):
    torch.manual_seed(0)
    cb = TensorRTExport(dirpath=tmp_path, output_names=["policy", "value"], **export_kwargs)
    qat = QuantizationAwareTraining("int8", calibrator="entropy", calib_batches=2, start_step=3, verbose=False)
    callbacks = [*([TwoFourSparsity(start_step=1, verbose=False)] if sparsity else []), qat, cb, *extra_callbacks]
    kwargs = {"max_steps": 6, "logger": False, "enable_progress_bar": False, **(trainer_kwargs or {})}
    trainer = pl.Trainer(accelerator="cpu", callbacks=callbacks, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **kwargs)  # fmt: skip
    trainer.fit(model or BoardNet(), board_loader(64, 16), board_loader(48, 16))
    return cb


def test_fit_end_writes_artifacts_and_report(tmp_path, capsys):
    cb = _fit(tmp_path, metrics={"value": "torchmetrics.MeanAbsoluteError"}, max_metric_drop=1.0)
    assert "validating" not in capsys.readouterr().out  # the Trainer's progress bar is off: so is ours
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
        _fit(tmp_path, model=Diverging(), max_metric_drop={"value/mse": 0.0})
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


def _report_columns(report: dict) -> set[str]:
    """The qatsparse/report/ names every report must reach the loggers with."""
    names = {"qatsparse/report/passed"}
    for backend, b in report["backends"].items():
        names |= {f"qatsparse/report/{backend}/{m}" for m in b["metrics"]}
        names |= {f"qatsparse/report/{backend}/latency_ms", f"qatsparse/report/{backend}/throughput_per_s"}
        if backend != report["reference"]:
            names |= {f"qatsparse/report/{backend}/drop/{m}" for m in b["metrics"]}
            names |= {f"qatsparse/report/{backend}/agreement/policy/top1_agreement"}
    return names


def test_csv_logger_gets_sparsity_quantization_and_report_with_tqdm_progress(tmp_path, capsys):
    import csv

    from pytorch_lightning.callbacks import TQDMProgressBar
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(tmp_path / "logs", name="run")
    cb = _fit(tmp_path / "out", {"logger": logger, "enable_progress_bar": True}, sparsity=True,
              extra_callbacks=[TQDMProgressBar()], max_metric_drop=1.0)  # fmt: skip
    out = capsys.readouterr()
    for task in ("calibrating INT8 (entropy)", "exporting ONNX", "validating pytorch_fp32", "validating onnxruntime"):
        assert task in out.err + out.out, task  # tqdm bars of the Trainer's kind
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert _report_columns(cb.report) <= columns
    final = next(r for r in rows if r["qatsparse/report/passed"])
    assert float(final["qatsparse/report/passed"]) == 1.0
    assert float(final["qatsparse/report/onnxruntime/policy/top1"]) == pytest.approx(
        cb.report["backends"]["onnxruntime"]["metrics"]["policy/top1"]
    )
    epoch = [r for r in rows if r.get("qatsparse/sparsity/pruned_layers")]
    assert epoch and float(epoch[-1]["qatsparse/sparsity/pruned_layers"]) == len(cb.report["sparsity"]["pruned_layers"])
    assert float(epoch[-1]["qatsparse/quantization/quantized_layers"]) == len(cb.report["quantization"]["quantized"])
    with open(f"{logger.log_dir}/hparams.yaml") as f:
        assert "qatsparse/quantization/calibrator: entropy" in f.read()


def _tensorboard_scalars(folder) -> dict[str, float]:
    """The last value of every scalar in TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, float] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out[v.tag] = v.simple_value
    return out


def test_tensorboard_logger_gets_the_report_with_rich_progress(tmp_path, capsys):
    pytest.importorskip("tensorboardX", reason="TensorBoardLogger needs tensorboard or tensorboardX (dev extra)")
    from pytorch_lightning.callbacks import RichProgressBar
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    cb = _fit(tmp_path / "out", {"logger": logger, "enable_progress_bar": True}, extra_callbacks=[RichProgressBar()],
              max_metric_drop=1.0)  # fmt: skip
    out = capsys.readouterr().out
    for task in ("calibrating INT8 (entropy)", "exporting ONNX", "validating onnxruntime"):
        assert task in out, task  # rich tasks in the Trainer's own display
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert _report_columns(cb.report) <= set(scalars)
    assert scalars["qatsparse/report/passed"] == 1.0
    assert scalars["qatsparse/report/pytorch_qat/policy/top1"] == pytest.approx(
        cb.report["backends"]["pytorch_qat"]["metrics"]["policy/top1"]
    )
