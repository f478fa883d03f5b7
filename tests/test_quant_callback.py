"""QuantizationAwareTraining: arguments, exact resume, load_from_checkpoint, FP16 overflow, auto_exclude."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import qatsparse.callbacks.quantization as qat_module
from qatsparse import QuantizationAwareTraining
from qatsparse.examples import DigitsDataModule, ResidualCNN
from qatsparse.lightning_compat import Callback
from qatsparse.quantization import (
    QuantConfig,
    calibrate,
    fake_cast_fp16,
    overflowing_layers,
    quantize_model,
    quantizers,
    sensitivity,
    track_overflow,
)
from tests.lightning_packages import PACKAGES, classes


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "int4"}, "precision must be one of ['int8', 'fp16'], got 'int4'"),
        ({"calibrator": "kl"}, "calibrator must be one of ['entropy', 'max', 'mse', 'percentile'], got 'kl'"),
        ({"percentile": 0}, "percentile must be in (0, 100], got 0"),
        ({"percentile": 100.5}, "percentile must be in (0, 100], got 100.5"),
        ({"percentile": math.nan}, "percentile must be in (0, 100], got nan"),
        ({"calib_batches": 0}, "calib_batches must be an integer >= 1, got 0"),
        ({"calib_batches": 2.5}, "calib_batches must be an integer >= 1, got 2.5"),
        ({"start_step": -1}, "QuantizationAwareTraining(start_step=-1): start_step must be an integer >= 0"),
        ({"auto_exclude": -2}, "auto_exclude must be an integer >= 0, got -2"),
        ({"sensitivity_metric": "f1"}, "sensitivity_metric must be one of ['agreement', 'mse', 'top1']"),
        ({"exclude": ["fc("]}, "exclude"),
        ({"exclude": ["(fc"]}, "pattern '(fc' is not a valid regular expression"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_valid_values(kwargs, message):
    with pytest.raises(ValueError) as e:
        QuantizationAwareTraining(**kwargs)
    assert message in str(e.value)


def test_percentile_100_is_valid():
    assert QuantizationAwareTraining(calibrator="percentile", percentile=100).config.percentile == 100


# ----------------------------------------------------------------------------- training helpers
def _trainer(tmp_path, callbacks: list, max_epochs: int, package: Any = pl, **kw: Any) -> pl.Trainer:
    return package.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )


class PlainCNN(ResidualCNN):
    """The example model without its ``on_load_checkpoint`` (restore_structure): the callback alone
    must restore the quantizers when training resumes."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pass


def _model(cls: type = PlainCNN) -> ResidualCNN:
    pl.seed_everything(0, verbose=False)
    return cls(widths=(8, 16), lr=0.05)


def _dm(cls: type = DigitsDataModule) -> DigitsDataModule:
    return cls(batch_size=64)


class StopAfterEpoch(Callback):
    """Interrupts training at the end of an epoch (as a crash or a time limit would)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.fixture
def count_calibrations(monkeypatch) -> list[int]:
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(qat_module, "calibrate", counting)
    return calls


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("package", PACKAGES)
def test_resume_and_load_from_checkpoint_are_bit_identical(tmp_path, count_calibrations, package):
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    lightning, ResidualCNN, Digits = classes(package)
    Plain = type("PlainCNN", (ResidualCNN,), {"on_load_checkpoint": PlainCNN.on_load_checkpoint})

    def qat() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(calibrator="entropy", calib_batches=2, start_step=2, verbose=False)

    # uninterrupted: 3 epochs of 4 steps, QAT from step 2
    full = _model(Plain)
    _trainer(tmp_path / "full", [qat()], 3, lightning).fit(full, _dm(Digits))
    assert len(count_calibrations) == 1

    # interrupted after epoch 2 (QAT started in epoch 1; same schedule length), then resumed
    first = _model(Plain)
    ckpt = lightning.callbacks.ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _trainer(tmp_path / "a", [qat(), ckpt, StopAfterEpoch(1)], 3, lightning).fit(first, _dm(Digits))
    assert first.trainer.current_epoch == 2
    assert len(count_calibrations) == 2
    path = tmp_path / "ckpt" / "epoch=1.ckpt"
    resumed = _model(Plain)
    cb = qat()
    _trainer(tmp_path / "b", [cb], 3, lightning).fit(resumed, _dm(Digits), ckpt_path=path)
    assert len(count_calibrations) == 2, "calibration must not run again on resume"
    assert cb.applied and "stages.0.0.residual_quantizer" in cb.report(resumed)["residual_quantizers"]

    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for k in full_state:
        assert torch.equal(full_state[k], resumed_state[k]), k
    full.eval(), resumed.eval()
    assert torch.equal(full(x), resumed(x))

    # load_from_checkpoint (no trainer; ResidualCNN calls restore_structure) restores the quantized
    # model, residual quantizers included
    loaded = ResidualCNN.load_from_checkpoint(path).eval()
    first.eval()
    assert list(quantizers(loaded)) == list(quantizers(first))
    assert all(q._has_amax for n, q in quantizers(loaded).items())
    assert torch.equal(loaded(x), first(x))


# ----------------------------------------------------------------------------- INT8 report
def test_int8_report_and_summary_table(tmp_path):
    model = _model()
    cb = QuantizationAwareTraining(calibrator="percentile", calib_batches=2, exclude=["^fc$"], verbose=False)
    _trainer(tmp_path, [cb], 1).fit(model, _dm())
    r = cb.report(model)
    assert r["applied"] and r["calibrator"] == "percentile" and r["percentile"] == 99.99
    assert r["keep_fp32"] == ["fc"] and r["skipped"] == {"fc": "excluded by user"}
    assert len(r["residual_quantizers"]) == 4 and len(r["residual_amax"]) == 4
    assert all(v > 0 for v in r["input_amax"].values())
    table = cb.describe(model)
    assert "stages.1.0.residual_quantizer" in table and "excluded by user" in table and "stem.0" in table


# ----------------------------------------------------------------------------- FP16
class Overflowing(pl.LightningModule):
    """A classifier whose ``big`` layer produces activations beyond the FP16 range. Its training steps
    run the forward only (no update), so the weights change only where the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.big = nn.Linear(256, 16)
        self.fc = nn.Linear(16, 10)
        self.extra = nn.Linear(10, 10)
        with torch.no_grad():
            self.big.weight.mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(F.relu(self.conv(x)), 1)
        return self.extra(self.fc(torch.tanh(self.big(h) * 1e-5)))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fp16_forward_sees_fp16_rounding():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8))
    ref = nn.Linear(8, 8)
    ref.load_state_dict(m[0].state_dict())
    quantize_model(m, QuantConfig(precision="fp16"))
    x = torch.randn(4, 8) * 3
    want = F.linear(fake_cast_fp16(x), fake_cast_fp16(ref.weight), ref.bias)
    assert torch.equal(m(x), want)
    assert not torch.equal(m(x), ref(x))


def test_overflowing_layers_named_for_range_inf_and_nan():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    quantize_model(m, QuantConfig(precision="fp16"))
    assert track_overflow(m) == ["0", "1", "2"]
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[0].bias.fill_(0.0)
        m[1].weight.fill_(0.0)
    m(torch.full((1, 2), 4e4))  # layer 0: 8e4 out; its input 4e4 is still in range
    # layer 1 gets 8e4 (-> inf in FP16, times 0 -> NaN); layer 2 gets NaN: not its fault, not flagged
    assert overflowing_layers(m) == {"0": pytest.approx(8e4), "1": math.inf}
    m2 = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    quantize_model(m2, QuantConfig(precision="fp16"))
    with torch.no_grad():
        m2[0].weight[0, 0] = 1e6  # beyond FP16: the rounded weight is inf
    track_overflow(m2)
    assert not torch.isfinite(m2(torch.ones(1, 2))).all()
    assert overflowing_layers(m2) == {"0": math.inf}


class ScaleUpLater(pl.Callback):
    """Makes ``fc`` overflow during epoch 2 (as weights drifting during fine-tuning could)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            with torch.no_grad():
                pl_module.fc.weight.mul_(1e6)


def test_fp16_overflow_flagged_kept_fp32_and_reported(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = Overflowing()
    cb = QuantizationAwareTraining(precision="fp16", calib_batches=2, exclude=["extra"], verbose=False)
    with pytest.warns(UserWarning, match="outside the FP16 range"):
        _trainer(tmp_path, [cb, ScaleUpLater()], 2).fit(model, _dm())
    r = cb.report(model)
    # `big` overflows on the calibration batches, `fc` during training; `extra` is excluded by the user
    assert set(r["fp16_overflow"]) == {"big", "fc"}
    assert r["keep_fp32"] == ["big", "extra", "fc"]
    assert "calibration" in r["higher_precision"]["big"] and "training" in r["higher_precision"]["fc"]
    assert type(model.big) is nn.Linear and type(model.fc) is nn.Linear  # no FP16 rounding any more
    assert type(model.conv).__name__ == "QuantConv2d"


# ----------------------------------------------------------------------------- sensitivity
def _sensitive_mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        m[2].weight[:, 0] = 50.0  # one huge weight per output channel: coarse per-channel scales
    return m


def test_sensitivity_ranks_the_damaged_layer_first():
    m = _sensitive_mlp()
    data = [(torch.randn(32, 16), torch.randint(0, 4, (32,))) for _ in range(3)]
    rows = sensitivity(m, data, "mse")
    assert rows[0].name == "2"
    assert {r.name for r in rows} == {"0", "2", "4"}
    assert rows[0].drop > 3 * rows[1].drop > 0
    assert type(m[0]) is nn.Linear  # the model itself was not touched
    # top1 and a custom metric work too
    assert len(sensitivity(m, data, "top1")) == 3
    custom = sensitivity(m, data, lambda out, ref, t: -float((out[0] - ref[0]).abs().max()))
    assert custom[0].name == "2"
    with pytest.raises(ValueError, match="metric must be one of"):
        sensitivity(m, data, "f1")


class MLPModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _sensitive_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)[:, :16])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y % 4)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-6)


def test_auto_exclude_keeps_most_sensitive_in_higher_precision(tmp_path, caplog):
    model = MLPModule()
    cb = QuantizationAwareTraining(calib_batches=2, auto_exclude=1, verbose=False)
    _trainer(tmp_path, [cb], 1).fit(model, _dm())
    r = cb.report(model)
    assert r["sensitivity"][0]["name"] == "net.2" and len(r["sensitivity"]) == 3
    assert r["keep_fp32"] == ["net.2"]
    assert "auto-excluded: sensitivity rank 1" in r["skipped"]["net.2"]
    assert type(model.net[2]) is nn.Linear
    assert quantizers(model)["net.0.input_quantizer"]._has_amax  # amax kept, no recalibration needed
    assert "quantization sensitivity" in caplog.text  # the table, printed through Lightning's logger


def test_exclude_may_be_one_regex_string_as_for_sparsity():
    assert QuantizationAwareTraining(exclude="fc").config.exclude == ["fc"]
