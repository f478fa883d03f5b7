"""TwoFourSparsity in real Lightning runs: start step, accumulation, optimizers, memory format, AMP,
logging, make_permanent, QAT + Q/DQ export."""

from __future__ import annotations

import copy
import csv
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qatsparse import QuantizationAwareTraining, TwoFourSparsity
from qatsparse.sparsity import check_2to4

PRUNABLE = ["conv1", "conv2", "fc"]  # conv_in (C_in=4), dw (depthwise), head (C_out=3) are skipped


class Tiny(pl.LightningModule):
    """A small CNN with eligible and ineligible layers, on random data."""

    def __init__(self, optimizer: str = "sgd", channels_last: bool = False, manual: bool = False) -> None:
        super().__init__()
        self.optimizer, self.channels_last = optimizer, channels_last
        self.automatic_optimization = not manual
        self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.example_input_array = torch.zeros(1, 4, 6, 6)
        self.steps_checked = 0
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.conv_in(x))
        x = F.relu(self.bn(self.conv1(x)))
        x = self.dw(self.conv2(x))
        return self.head(F.relu(self.fc(x.mean((2, 3)))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.automatic_optimization:
            return loss
        # Manual optimization with two optimizers; after each step the masks must already hold.
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            opt.step()
            if getattr(self, "_qatsparse_pruned", None):
                assert check_2to4(self) == [], f"masks broken right after {type(opt.optimizer).__name__}.step()"
                self.steps_checked += 1
        return None

    def configure_optimizers(self) -> Any:
        if not self.automatic_optimization:  # convs on one optimizer, linears on another
            convs = [p for n, p in self.named_parameters() if n.startswith(("conv", "bn", "dw"))]
            linears = [p for n, p in self.named_parameters() if n.startswith(("fc", "head"))]
            return torch.optim.SGD(convs, lr=0.1, momentum=0.9), torch.optim.Adam(linears, lr=1e-2)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 4, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8)


class Probe(pl.Callback):
    """Records, after each batch, the step, whether pruning happened and the 2:4 violations."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, bool, list]] = []
        self.dense_before = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pruned = getattr(pl_module, "_qatsparse_pruned", None)
        if pruned:
            self.rows.append((trainer.global_step, True, check_2to4(pl_module)))
        else:
            self.dense_before &= all(bool((getattr(pl_module, n).weight != 0).all()) for n in PRUNABLE)
            self.rows.append((trainer.global_step, False, []))


def _trainer(callbacks: list, **kw: Any) -> pl.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=6,
    )
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


def _zero_share(model: nn.Module, name: str) -> float:
    return float((getattr(model, name).weight == 0).float().mean())


def test_unmatched_include_fails_before_the_first_step():
    pl.seed_everything(0)
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    trainer = _trainer([TwoFourSparsity(include=["conv1", "layer4"])])
    with pytest.raises(ValueError, match="include: pattern 'layer4' matches no prunable weight"):
        trainer.fit(model)
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_prunes_at_start_step_and_masks_hold_with_grad_accumulation(optimizer):
    pl.seed_everything(0)
    model, sparsity, probe = Tiny(optimizer=optimizer), TwoFourSparsity(start_step=2, verbose=False), Probe()
    trainer = _trainer([sparsity, probe], max_steps=5, accumulate_grad_batches=2)
    trainer.fit(model)
    assert sparsity.pruned_at_step == 2 and sorted(sparsity.pruned_layers) == PRUNABLE
    assert set(sparsity.masks.skipped) == {"conv_in", "dw", "head"}
    assert probe.dense_before and [r[0] for r in probe.rows if not r[1]] == [0, 1, 1, 2]  # global_step after each batch
    assert [r[0] for r in probe.rows if r[1]] == [2, 3, 3, 4, 4, 5]  # 3 optimizer steps after pruning
    assert all(r[2] == [] for r in probe.rows)
    assert all(_zero_share(model, n) == 0.5 for n in PRUNABLE)
    assert check_2to4(model) == []


def test_kept_weights_train_and_pruned_stay_zero_with_channels_last_and_bf16_mixed():
    pl.seed_everything(0)
    model, sparsity = Tiny(channels_last=True), TwoFourSparsity(start_step=1, verbose=False)
    probe = Probe()
    _trainer([sparsity, probe], precision="bf16-mixed", max_steps=4).fit(model)
    assert sparsity.pruned_at_step == 1 and all(r[2] == [] for r in probe.rows)
    for name in PRUNABLE:
        w, mask = getattr(model, name).weight, sparsity.masks.masks[name]
        assert w.dtype == torch.float32
        assert bool((w[~mask] == 0).all()) and bool((w[mask] != 0).all())
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv2.weight.is_contiguous(memory_format=torch.channels_last)


def test_manual_optimization_with_two_optimizers_keeps_masks_after_each_step():
    pl.seed_everything(0)
    model, sparsity = Tiny(manual=True), TwoFourSparsity(start_step=0, verbose=False)
    before = {n: getattr(model, n).weight.detach().clone() for n in PRUNABLE}
    _trainer([sparsity], max_steps=8).fit(model)  # global_step counts both optimizers' steps
    assert model.steps_checked == 8
    assert check_2to4(model) == []
    for n in PRUNABLE:  # the kept weights did train
        kept = sparsity.masks.masks[n]
        assert not torch.equal(getattr(model, n).weight[kept], before[n][kept])


@pytest.mark.parametrize("make_permanent", [True, False])
def test_make_permanent_leaves_plain_modules_without_hooks(make_permanent):
    pl.seed_everything(0)
    model, sparsity = Tiny(), TwoFourSparsity(make_permanent=make_permanent, verbose=False)
    trainer = _trainer([sparsity], max_steps=3)
    trainer.fit(model)
    assert check_2to4(model) == []
    assert {type(getattr(model, n)) for n in PRUNABLE} == {nn.Conv2d, nn.Linear}
    assert set(model.state_dict()) == set(Tiny().state_dict())  # no extra buffers or parameters
    # One more step of the same optimizer, outside the Trainer: only the kept hooks re-zero the weights.
    opt = trainer.optimizers[0]
    x, y = next(iter(model.train_dataloader()))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert (check_2to4(model) == []) is (not make_permanent)


def test_sparsity_is_logged_per_layer_and_overall(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    pl.seed_everything(0)
    model = Tiny()
    trainer = _trainer(
        [TwoFourSparsity(verbose=False)], logger=CSVLogger(tmp_path, name="run"), max_steps=-1, max_epochs=2
    )
    trainer.fit(model)
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("qatsparse/sparsity/zero_share")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for n in PRUNABLE:
        assert {float(r[f"qatsparse/sparsity/layer_zero_share/{n}"]) for r in rows} == {0.5}
    assert {float(r["qatsparse/sparsity/pruned_layer_zero_share"]) for r in rows} == {0.5}
    assert {float(r["qatsparse/sparsity/pruned_layers"]) for r in rows} == {len(PRUNABLE)}
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    overall = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert float(rows[-1]["qatsparse/sparsity/zero_share"]) == pytest.approx(overall)


def test_summary_printed_at_prune_time(caplog):
    import logging

    pl.seed_everything(0)
    with caplog.at_level(logging.INFO, logger="pytorch_lightning"):
        _trainer([TwoFourSparsity()], max_steps=1).fit(Tiny())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "2:4 sparsity: pruned 3 of 6 Conv2d/Linear weights" in text
    assert "depthwise conv: not supported by sparse kernels: dw" in text
    assert "C_in=4 not a multiple of 16: conv_in" in text


def test_permute_reorders_channels_before_the_masks_and_reports_kept_magnitude(caplog):
    import logging

    pl.seed_everything(0)
    model, sparsity = Tiny(), TwoFourSparsity(start_step=2, permute=True)
    with caplog.at_level(logging.INFO, logger="pytorch_lightning"):
        _trainer([sparsity], max_steps=4).fit(model)
    assert check_2to4(model) == [] and sorted(sparsity.pruned_layers) == PRUNABLE
    p = sparsity.permutation
    # conv_in -> conv1, conv1 -> bn -> conv2, conv2 -> depthwise dw -> mean -> fc: three groups, all searched
    assert p["groups_searched"] == 3 and p["not_permuted"] == {} and p["max_output_difference"] < 1e-5
    k = sparsity.kept_magnitude()["kept_magnitude"]
    assert set(k["layers"]) == set(PRUNABLE)
    assert all(v["permuted"] >= v["plain"] for v in k["layers"].values())
    assert k["overall"]["permuted"] > k["overall"]["plain"]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "with channel permutation" in text and "channel permutation: " in text


@pytest.mark.parametrize("order", ["qat_earlier", "same_step_qat_first"])
def test_permute_after_qat_calibration_fails_at_setup(order):
    sparsity = TwoFourSparsity(start_step=4, permute=True, verbose=False)
    qat = QuantizationAwareTraining(calib_batches=1, start_step=2 if order == "qat_earlier" else 4, verbose=False)
    trainer = _trainer([qat, sparsity])
    with pytest.raises(ValueError, match=r"set QuantizationAwareTraining.start_step >= 4 .* or permute=False"):
        trainer.fit(Tiny())
    assert trainer.global_step == 0


def test_permute_arguments_are_validated():
    with pytest.raises(ValueError, match="permute must be True or False"):
        TwoFourSparsity(permute="yes")
    with pytest.raises(ValueError, match=r"permute_search must be a .*SearchConfig"):
        TwoFourSparsity(permute=True, permute_search={"escapes": 2})


def test_sparse_then_qat_model_exports_qdq_onnx_that_is_still_2to4(tmp_path):
    import onnx

    from qatsparse.export.onnx import export_onnx, record_pruned_layers
    from qatsparse.quantization import is_quantized, prepare_for_onnx_export

    pl.seed_everything(0)
    model, sparsity = Tiny(), TwoFourSparsity(start_step=0, verbose=False)
    qat = QuantizationAwareTraining(precision="int8", calibrator="max", calib_batches=2, start_step=2)
    _trainer([sparsity, qat], max_steps=5).fit(model)
    assert is_quantized(model) and check_2to4(model) == []
    deploy = copy.deepcopy(model)
    prepare_for_onnx_export(deploy)
    path = export_onnx(deploy, [model.example_input_array], tmp_path / "model.onnx")
    assert set(record_pruned_layers(path, sparsity.pruned_layers)) == set(PRUNABLE)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert check_2to4(path) == []
    assert len(check_2to4(path, layers="all")) == 3  # conv_in, dw, head: dense


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed (fp16 autocast + GradScaler) needs CUDA")
def test_masks_hold_under_16_mixed_on_gpu():
    pl.seed_everything(0)
    model, sparsity, probe = Tiny(channels_last=True), TwoFourSparsity(start_step=1, verbose=False), Probe()
    _trainer([sparsity, probe], accelerator="gpu", precision="16-mixed", max_steps=6).fit(model)
    assert sparsity.pruned_at_step == 1 and all(r[2] == [] for r in probe.rows)
    assert all(_zero_share(model, n) == 0.5 for n in PRUNABLE)
