"""Lose nothing after training: model.ckpt before the export, a partial report and a resume command when a
later step fails, the export finished from the checkpoint (CLI and Python), one-call loading."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

import qatsparse
from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
from qatsparse.cli import main
from qatsparse.export.runners import OnnxRuntimeRunner
from qatsparse.quantization import quantizers
from qatsparse.recovery import ExportFailed
from qatsparse.sparsity import check_2to4
from tests.test_errors import Tiny, loaders
from tests.test_recipes_helpers import shortened


def _fail(monkeypatch, target: str, error: Exception) -> None:
    """Make ``target`` (``module.name``, where the pipeline looks it up) raise ``error`` (a full disk, a
    TensorRT builder error, ...)."""

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(target, broken)


def _fit(out: Path, model: Tiny | None = None) -> None:
    torch.manual_seed(0)
    model = model or Tiny()
    export = TensorRTExport(dirpath=out, max_metric_drop=1.0)
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            TwoFourSparsity(start_step=1, verbose=False),
            QuantizationAwareTraining(calib_batches=2, start_step=3, verbose=False),
            export,
        ],
    )
    trainer.fit(model, *loaders())


@pytest.mark.parametrize(
    ("broken", "error", "stage", "completed"),
    [
        ("qatsparse.artifacts.export_onnx", OSError(28, "No space left on device"), "export", ["checkpoint"]),
        (
            "qatsparse.pipeline.maybe_build_engine",
            RuntimeError("builder failed"),
            "engine",
            ["checkpoint", "export", "lint", "handoff"],
        ),
        (
            "qatsparse.pipeline.validate",
            RuntimeError("out of memory"),
            "validation",
            ["checkpoint", "export", "lint", "handoff", "engine"],
        ),
    ],
)
def test_a_failure_after_training_keeps_the_model_and_says_how_to_finish(
    monkeypatch, tmp_path, broken, error, stage, completed
):
    _fail(monkeypatch, broken, error)
    out = tmp_path / "out"
    with pytest.raises(ExportFailed) as e:
        _fit(out)
    ckpt = out / "model.ckpt"
    msg = str(e.value)
    assert f"the {stage} step failed after training" in msg and str(error) in msg
    assert f"The trained model is saved in {ckpt}" in msg
    assert f"qatsparse export --config <your recipe> --ckpt_path {ckpt}" in msg
    assert ".export_checkpoint(YourModel" in msg
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["complete"] is False
    assert report["failed_stage"] == stage and report["completed_stages"] == completed
    assert report["error"]["message"] == str(error) and report["checkpoint"] == str(ckpt)
    written = {"model_fp32.onnx", "model.onnx"} if "export" in completed else set()
    written |= {"tensorrt"} if "handoff" in completed else set()
    assert set(report["artifacts"]) == {"model.ckpt", *written}
    assert not (out / "report.md").exists() and not list(out.glob(".*.tmp"))
    state = torch.load(ckpt, weights_only=False)  # a complete Lightning checkpoint
    assert state["global_step"] == 6 and state["qatsparse"]["quantization"]["precision"] == "int8"


class ValidatingTiny(Tiny):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    """A QAT + 2:4 run whose ONNX export failed: (the model at fit end, its dirpath)."""
    out = tmp_path_factory.mktemp("failed") / "out"
    torch.manual_seed(0)
    model = ValidatingTiny()
    with pytest.MonkeyPatch.context() as mp:
        _fail(mp, "qatsparse.artifacts.export_onnx", OSError(28, "No space left on device"))
        with pytest.raises(ExportFailed):
            _fit(out, model)
    return model.eval(), out


def test_the_export_finishes_from_the_checkpoint_in_python(failed_run):
    trained, out = failed_run
    report = TensorRTExport(dirpath=out, max_metric_drop=1.0).export_checkpoint(Tiny, out / "model.ckpt", loaders()[1])
    assert report["passed"] is True and report["quantization"]["precision"] == "int8"
    assert report["sparsity"]["pruned_layers"] == ["body.0"] and check_2to4(out / "model.onnx") == []
    assert json.loads((out / "report.json").read_text())["passed"] is True
    x = loaders()[1].dataset.tensors[0]
    with torch.no_grad():
        expected = trained.eval()(x).argmax(1)
    got = OnnxRuntimeRunner(out / "model.onnx")((x,))[0].argmax(1)
    assert float((got == expected).float().mean()) >= 0.95  # INT8 + FP16 in ONNX Runtime vs the fake-quant model


class Mixed(qatsparse.CompressedCheckpointMixin, ValidatingTiny):
    """A user's module with the mixin: Lightning's own loading restores the compression."""


def _same_model(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = torch.equal(a.eval()(x), b.eval()(x))
    return same and list(quantizers(a)) == list(quantizers(b)) and a.state_dict().keys() == b.state_dict().keys()


def test_one_call_loads_a_compressed_checkpoint_and_the_plain_call_names_the_fix(failed_run):
    trained, out = failed_run
    ckpt = out / "model.ckpt"
    assert sum(n.endswith("input_quantizer") for n in quantizers(trained)) == 2 and check_2to4(trained) == []
    loaded = qatsparse.load_from_checkpoint(ValidatingTiny, ckpt)
    assert _same_model(loaded, trained) and check_2to4(loaded) == []
    assert _same_model(Mixed.load_from_checkpoint(ckpt), trained)
    with pytest.raises(RuntimeError, match=r"qatsparse.load_from_checkpoint\(ValidatingTiny, path\), mix"):
        ValidatingTiny.load_from_checkpoint(ckpt)
    with pytest.raises(TypeError, match="restore_structure"):
        qatsparse.load_from_checkpoint(nn.Linear, ckpt)


def test_trainer_validate_on_the_checkpoint_with_the_mixin_and_the_fix_without_it(failed_run):
    _, out = failed_run
    ckpt, data = out / "model.ckpt", DataLoader(loaders()[1].dataset, batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    [metrics] = trainer.validate(Mixed(), data, ckpt_path=ckpt)
    assert metrics["val_loss"] > 0
    with pytest.raises(RuntimeError, match=r"mix qatsparse\.CompressedCheckpointMixin into ValidatingTiny"):
        trainer.validate(ValidatingTiny(), data, ckpt_path=ckpt)


def test_qatsparse_export_completes_a_cli_run_whose_export_failed(monkeypatch, tmp_path):
    cfg = shortened("digits_int8_sparse", tmp_path, 12, 4, 8, model={"widths": [8, 16]})
    with monkeypatch.context() as mp:
        _fail(mp, "qatsparse.artifacts.export_onnx", OSError(28, "No space left on device"))
        with pytest.raises(ExportFailed) as e:
            main(["fit", "--config", str(cfg)])
    out = tmp_path / "runs" / "digits_int8_sparse"
    [command] = [line.strip() for line in str(e.value).splitlines() if line.strip().startswith("qatsparse export")]
    args = shlex.split(command)
    assert args[:3] == ["qatsparse", "export", "--config"] and args[4:] == ["--ckpt_path", str(out / "model.ckpt")]
    assert Path(args[3]).name == "config.yaml" and Path(args[3]).is_file()  # the config `qatsparse fit` saved
    assert json.loads((out / "report.json").read_text())["resume"] == command
    main(args[1:])  # the command from the error, as the user would paste it
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["precision"] == "int8" and report["sparsity"]["pruned_layers"]
    b = report["backends"]
    assert b["onnxruntime"]["metrics"]["top1"] == pytest.approx(b["pytorch_qat"]["metrics"]["top1"], abs=0.02)
    assert "complete" not in report and (out / "report.md").is_file() and check_2to4(out / "model.onnx") == []
