"""Numerical health is checked, not assumed (issue 11): calibration sees the statistics training sees, a
blow-up after a compression step is reported at once with the step and the layers, FP16 changes to a
layer's constants fail the report."""

from __future__ import annotations

import copy
import platform
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from qatsparse import QuantizationAwareTraining, TensorRTExport
from qatsparse.examples import DigitsDataModule, ResidualCNN
from qatsparse.pipeline import ExportSettings, export_and_validate
from qatsparse.quantization import QuantConfig, calibrate, quantize_model, quantizers

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _unsettled() -> nn.Sequential:
    """conv -> BN whose running statistics are far from the data's (QAT started before they settled)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with torch.no_grad():
        net[1].running_var.fill_(1e-4)  # eval-mode activations ~100x the batch-normalized ones
    return net


def test_calibration_uses_batch_statistics_and_leaves_running_statistics_untouched():
    x = torch.randn(16, 3, 8, 8)
    net = _unsettled()
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    with torch.no_grad():  # what training computes (batch statistics) and what eval computes
        train_peak = float(net[2](copy.deepcopy(net[:2]).train()(x)).abs().max())
        eval_peak = float(net[2](net[:2].eval()(x)).abs().max())
    assert eval_peak > 20 * train_peak
    for mode, expected in (("batch", train_peak), ("running", eval_peak)):
        q = copy.deepcopy(net)
        quantize_model(q, QuantConfig())
        calibrate(q, [x], q, batchnorm=mode)
        amax = float(quantizers(q)["4.input_quantizer"].amax)
        assert amax == pytest.approx(expected, rel=1e-5), mode
        for k, v in q[1].state_dict().items():
            assert torch.equal(v, before[k]), f"{mode}: calibration changed BatchNorm's {k}"
    # one value per channel (a batch of 1 after a global pool): no batch statistics exist, running ones are used
    head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    quantize_model(head, QuantConfig())
    calibrate(head, [torch.randn(1, 8)], head)
    assert head.training and quantizers(head)["2.input_quantizer"].calibrated  # and the mode restored


class _LrJump(ResidualCNN):
    """A learning rate 1e6 times larger from step 10 on: the kind of mistake that wrecks a fine-tuning."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 10 else 1e6)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _trainer(qat: QuantizationAwareTraining, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=[qat],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def _blow_up_fit(max_steps: int) -> tuple[QuantizationAwareTraining, pl.Trainer, _LrJump, list]:
    """QAT from step 10 on a model whose learning rate jumps at step 10; the warnings the fit raised."""
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_step=10, calib_batches=2, verbose=False)
    trainer = _trainer(qat, max_steps=max_steps)
    model = _LrJump(widths=(16, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    return qat, trainer, model, caught


def test_a_blow_up_after_qat_starts_is_reported_at_once_with_the_step_and_layers():
    qat, _, model, caught = _blow_up_fit(max_steps=16)
    [event] = qat.health.monitor.events
    assert 10 <= event.step <= 12 and event.after == "INT8 QAT started at step 10"
    assert event.layers and all("gradient norm" in x or "non-finite" in x for x in event.layers)
    messages = [str(w.message) for w in caught if "qatsparse:" in str(w.message) and "most likely" in str(w.message)]
    assert len(messages) == 1 and f"at step {event.step}" in messages[0]
    assert qat.report(model)["health"] == [event.to_dict()]


def test_a_blow_up_at_the_last_step_is_still_reported_with_its_step():
    """The checks read a step's numbers one step later (no GPU sync in the window); the last step's are read
    at train end, before anything reports."""
    qat, trainer, model, caught = _blow_up_fit(max_steps=12)
    [event] = qat.health.monitor.events
    assert event.step == trainer.global_step - 1 == 11  # the last optimizer step
    assert [w for w in caught if f"at step {event.step}" in str(w.message) and "most likely" in str(w.message)]
    assert qat.report(model)["health"] == [event.to_dict()]


def test_quiet_training_reports_nothing():
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_step=4, calib_batches=2, verbose=False)
    trainer = _trainer(qat, max_steps=8)
    trainer.fit(ResidualCNN(widths=(16, 32)), datamodule=DigitsDataModule(batch_size=32))
    assert qat.health.monitor.events == []


def test_both_callbacks_share_one_gradient_norm_per_step_and_see_the_same_norms(monkeypatch):
    """The 2:4 and QAT callbacks watch the same model: one fused norm (and GPU sync) per step, not one each."""
    from qatsparse import TwoFourSparsity
    from qatsparse.health import _module_grad_norms

    calls: list[int] = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: calls.append(len(ts)) or real(ts, *a, **k))
    pl.seed_everything(0)
    sparsity = TwoFourSparsity(start_step=0, verbose=False)
    qat = QuantizationAwareTraining(start_step=2, calib_batches=1, verbose=False)
    seen: list[tuple[int, dict[str, float], dict[str, float]]] = []

    class Probe(pl.Callback):  # runs after both callbacks' hooks: their norms, against a fresh computation
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            shared = _module_grad_norms(pl_module, trainer.global_step)
            seen.append((len(calls), shared, _module_grad_norms(pl_module)))

    trainer = _trainer(qat, max_steps=6)
    trainer.callbacks[:] = [sparsity, qat, Probe()]
    trainer.fit(ResidualCNN(widths=(16, 32)), datamodule=DigitsDataModule(batch_size=32))
    counts = [n for n, _, _ in seen]
    # steps 0-1: the QAT callback records its baseline, 2:4 watches; from step 2 both watch. The probe's own
    # fresh computation is the only other norm of a step: two per step in all.
    assert [b - a for a, b in zip([0, *counts], counts)] == [1, 2, 2, 2, 2, 2], counts
    assert len(set(calls)) == 1  # every computation covered all the model's gradients
    for _, shared, fresh in seen:
        assert shared == fresh
    assert sparsity.health.monitor.events == [] and qat.health.monitor.events == []


class _Masked(nn.Module):
    """A float32-min fill value (an attention-mask idiom) and a BatchNorm whose scale training blew up."""

    def __init__(self, blown: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        if blown:
            with torch.no_grad():
                self.bn.weight.fill_(1e8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).mean((2, 3))
        h = h.masked_fill(h < -1e30, torch.finfo(torch.float32).min)
        return self.fc(h)


@pytest.mark.parametrize("blown", [False, True])
def test_fp16_clamping_a_layers_constants_fails_the_report_and_a_mask_value_does_not(tmp_path, blown):
    torch.manual_seed(0)
    model = _Masked(blown).eval()
    quantize_model(model, QuantConfig())
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    calibrate(model, [b[0] for _, b in zip(range(2), dm.train_dataloader())], model)
    model.example_input_array = torch.zeros(1, 1, 8, 8)
    report = export_and_validate(
        model,
        None,
        dm.val_dataloader(),
        ExportSettings(dirpath=tmp_path, max_metric_drop=1.0, handoff=False),
        console=False,
    )
    clamp_notes = [n for n in report["notes"] if "beyond the FP16 range" in n]
    assert clamp_notes, "the float32-min fill value is clamped either way (noted)"
    failures = [f for f in report["gate"]["failures"] if "FP16 changed the numbers" in f]
    if blown:
        assert not report["passed"]
        assert failures[0].startswith("model.onnx: FP16 changed the numbers of bn (BatchNormalization constant")
        # bn's output (~1e8) then also drives fc's input Q/DQ scale beyond the FP16 range: named too
        assert all(" of bn " in f or " of fc.input_quantizer " in f for f in failures)
    else:
        assert report["passed"] and not failures


def _vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: do not claim saturation
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def test_onnxruntime_level_is_probed_chosen_and_reported(tmp_path):
    """Two quantized Linears on tokens (exported as MatMul) with every weight at +-max: ONNX Runtime's
    default level fuses DequantizeLinear+MatMul into MatMulIntegerToFloat, whose u8 x s8 pair sums saturate
    at 16 bits on x86 CPUs without VNNI; the unoptimized graph computes the Q/DQ arithmetic as written."""
    from qatsparse.export.onnx import export_onnx
    from qatsparse.export.ort_level import AGREE_COSINE, choose_graph_optimization
    from qatsparse.export.runners import OnnxRuntimeRunner
    from qatsparse.quantization import prepare_for_onnx_export

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        for i in (0, 2):
            net[i].weight.copy_(torch.sign(torch.randn_like(net[i].weight)))
    x = torch.rand(32, 8, 64)
    net.eval()
    quantize_model(net, QuantConfig())
    calibrate(net, [x], net)
    with torch.no_grad():
        want = net(x).double().flatten()
    prepare_for_onnx_export(net)
    path = export_onnx(net, [x[:1]], tmp_path / "m.onnx", opset=19)

    choice = choose_graph_optimization(path, (x,))
    cosine = choice.probe["output_0"]["cosine"]
    assert choice.level == ("disabled" if cosine < AGREE_COSINE else "all")
    if platform.machine() in ("x86_64", "AMD64") and not _vnni():
        assert choice.level == "disabled" and choice.changed and "MatMulIntegerToFloat" in choice.fused_ops
        assert "MatMulIntegerToFloat" in choice.why and "ORT_DISABLE_ALL" in choice.why
    got = OnnxRuntimeRunner(path, optimization=choice.level)((x,))[0].double().flatten()
    assert float(got @ want / (got.norm() * want.norm())) > 0.9999  # the level used computes the QAT model
    fixed = choose_graph_optimization(path, (x,), requested="all")
    assert fixed.level == "all" and fixed.why.startswith("ort_graph_optimization='all' as given")
    with pytest.raises(ValueError, match=r"ort_graph_optimization='fast'.*'auto', 'all', 'extended'"):
        TensorRTExport(ort_graph_optimization="fast")


def test_docs_batchnorm_table_is_the_one_the_script_makes_from_the_raw_json():
    import json
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import bn_calibration
    finally:
        sys.path.remove(str(root / "benchmarks"))
    results = json.loads((root / "benchmarks" / "results" / "bn_calibration.json").read_text())
    assert bn_calibration.table(results) in (root / "docs" / "quantization.md").read_text()
