"""What the checks before step 0 accept and leave untouched: glob and regex patterns, the training pass
(sampler order, persistent workers, DDP sampler epoch, RNG, module state), the validation loader given to
``fit`` when the validation loop never runs. The rejected inputs are in test_errors.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
from qatsparse.loaders import peek
from qatsparse.patterns import compile_pattern
from qatsparse.preflight import check_forward
from tests.test_errors import Tiny, loaders


def test_patterns_are_regexes_or_globs():
    names = ["stem.0", "layer1.0.conv1", "layer1.0.downsample.0", "head.fc"]

    def matched(pattern: str) -> list[str]:
        p = compile_pattern(pattern)
        return [n for n in names if p.matches(n)]

    assert matched("fc") == ["head.fc"]  # a regex, searched anywhere
    assert matched(r"^layer1\.0\.") == ["layer1.0.conv1", "layer1.0.downsample.0"]
    assert matched("*head*") == ["head.fc"]  # not a valid regex: read as a glob (ModelOpt style)
    assert matched("*.downsample.*") == ["layer1.0.downsample.0"]
    assert matched("glob:layer?.0.conv1") == ["layer1.0.conv1"]  # forced glob: `?` is one character
    assert compile_pattern("layer?").kind == "regex"
    with pytest.raises(ValueError, match=r"pattern '\[fc' is not a valid regular expression"):
        compile_pattern("[fc")


def test_a_glob_exclude_keeps_the_head_dense():
    torch.manual_seed(0)
    model = Tiny()
    sparsity = TwoFourSparsity(start_step=0, exclude=["*fc*"], verbose=False)
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[sparsity]).fit(model, loaders()[0])  # fmt: skip
    assert sparsity.pruned_layers == ["body.0"] and "fc" in sparsity.masks.skipped


def _order(loader: DataLoader) -> list[int]:
    return [int(i) for batch in loader for i in batch[0]]


def test_peek_leaves_the_training_order_and_the_sampler_state_alone():
    data = TensorDataset(torch.arange(32))
    seeded = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))
    expected = _order(DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5)))
    first = peek(seeded)
    assert first[0].tolist() == expected[:8] and _order(seeded) == expected

    persistent = DataLoader(data, batch_size=8, num_workers=1, persistent_workers=True)
    assert peek(persistent)[0].tolist() == list(range(8))
    assert persistent._iterator is None  # no worker iterator was started (or reset) for the peek

    ddp = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
    ddp.set_epoch(4)
    sharded = DataLoader(data, batch_size=4, sampler=ddp)
    before = _order(sharded)
    peek(sharded)
    assert ddp.epoch == 4 and _order(sharded) == before


class Recording(Tiny):
    """Records the sample indices of every training batch (the batch is (index, x, y))."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def batch_inputs(self, batch: Any) -> tuple[torch.Tensor]:
        return (batch[1],)

    def batch_targets(self, batch: Any) -> tuple[torch.Tensor]:
        return (batch[2],)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen += batch[0].tolist()
        return F.cross_entropy(self(batch[1]), batch[2])


def test_the_checks_and_calibration_do_not_change_the_training_order():
    """A seeded shuffling loader: the fit with QAT (a preflight batch, then 2 calibration batches mid-epoch)
    trains on exactly the samples, in the order, of the same fit without any qatsparse callback."""
    x, y = loaders()[0].dataset.tensors
    data = TensorDataset(torch.arange(len(x)), x, y)

    def seen(callbacks: list) -> list[int]:
        torch.manual_seed(0)
        model = Recording()
        loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7))
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip
        trainer.fit(model, loader)
        return model.seen

    qat = QuantizationAwareTraining(calib_batches=2, start_step=2, verbose=False)
    order = seen([qat])
    assert qat.applied and len(order) == 2 * len(data) and order == seen([])


class Noisy(nn.Module):
    """Draws random numbers and has BatchNorm statistics: a forward that could leave traces."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x + 0.1 * torch.randn_like(x)))


def test_the_forward_check_leaves_no_trace():
    torch.manual_seed(0)
    model = Noisy().train()
    model.fc.eval()  # a submodule kept in eval mode on purpose stays so
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randn(8, 16) * 5, torch.zeros(8))
    rng = torch.get_rng_state()
    check_forward(model, batch, "test")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN running stats included
    assert model.training and model.bn.training and not model.fc.training


def test_the_validation_loader_given_to_fit_is_found_without_a_validation_loop(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
               callbacks=[TensorRTExport(dirpath=tmp_path, max_metric_drop=1.0)]).fit(Tiny(), train, val)  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["samples"] == len(val.dataset) and report["passed"] is True
