"""Exact resume after pruning, masks after any restore, and load_from_checkpoint of a sparse checkpoint,
under both Lightning packages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qatsparse import TwoFourSparsity
from qatsparse.examples import DigitsDataModule
from qatsparse.lightning_compat import Callback
from qatsparse.sparsity import check_2to4
from tests.lightning_packages import PACKAGES, classes

BATCH = 128
STEPS_PER_EPOCH = 1438 // BATCH  # DigitsDataModule: 1438 training images, drop_last
EPOCHS = 4


class _AfterRestore(Callback):
    """Checks the 2:4 pattern at on_train_start, i.e. right after Lightning restored a checkpoint."""

    violations: list | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "_qatsparse_pruned", None):
            self.violations = check_2to4(pl_module)


def _fit(package: str, ckpt_dir: Path, max_epochs: int, ckpt_path: Path | None = None, permute: bool = False) -> tuple:
    pl, ResidualCNN, Digits = classes(package)
    pl.seed_everything(0)
    model = ResidualCNN(widths=(16, 32), lr=0.05)
    # pruning at epoch 1's start
    sparsity = TwoFourSparsity(start_step=STEPS_PER_EPOCH, exclude=["fc"], verbose=False, permute=permute)
    probe = _AfterRestore()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        deterministic=True,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[sparsity, probe, pl.callbacks.ModelCheckpoint(ckpt_dir, filename="{epoch}", save_top_k=-1)],
    )
    trainer.fit(model, Digits(batch_size=BATCH), ckpt_path=ckpt_path)
    assert trainer.global_step == STEPS_PER_EPOCH * max_epochs
    return model, sparsity, [probe.violations]


@pytest.fixture(scope="module", params=PACKAGES)
def uninterrupted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    model, sparsity, _ = _fit(request.param, d, EPOCHS)
    return request.param, d, model, sparsity


def _outputs(model) -> torch.Tensor:
    dm = DigitsDataModule(batch_size=BATCH)
    dm.setup()
    x = next(iter(dm.val_dataloader()))[0]
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("resume_epoch", [0, 1], ids=["ckpt_before_pruning", "ckpt_after_pruning"])
def test_resume_is_bit_identical(uninterrupted, tmp_path, resume_epoch):
    package, d, full, full_sparsity = uninterrupted
    assert full_sparsity.pruned_at_step == STEPS_PER_EPOCH and check_2to4(full) == []
    resumed, sparsity, [after_restore] = _fit(package, tmp_path, EPOCHS, ckpt_path=d / f"epoch={resume_epoch}.ckpt")
    if resume_epoch == 1:
        assert after_restore == []  # masks re-attached and holding at on_train_start
    assert sparsity.pruned_at_step == STEPS_PER_EPOCH
    assert sparsity.masks.masks.keys() == full_sparsity.masks.masks.keys()
    assert all(torch.equal(sparsity.masks.masks[k], full_sparsity.masks.masks[k]) for k in sparsity.masks.masks)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    assert torch.equal(_outputs(full), _outputs(resumed))


def test_restore_of_a_tampered_checkpoint_is_re_masked(uninterrupted, tmp_path):
    package, d, _, full_sparsity = uninterrupted
    ckpt = torch.load(d / "epoch=1.ckpt", weights_only=False)
    layer = next(iter(full_sparsity.masks.masks))
    ckpt["state_dict"][f"{layer}.weight"].fill_(0.01)  # every pruned weight of this layer is nonzero now
    torch.save(ckpt, tmp_path / "tampered.ckpt")
    _, _, [after_restore] = _fit(package, tmp_path / "out", 3, ckpt_path=tmp_path / "tampered.ckpt")
    assert after_restore == []


def test_load_from_checkpoint_gives_a_working_sparse_model(uninterrupted):
    package, d, full, sparsity = uninterrupted
    loaded = classes(package)[1].load_from_checkpoint(d / f"epoch={EPOCHS - 1}.ckpt", map_location="cpu")
    assert sorted(loaded._qatsparse_pruned) == sorted(sparsity.pruned_layers)
    assert check_2to4(loaded) == []
    modules = dict(loaded.named_modules())
    assert all(float((modules[n].weight == 0).float().mean()) == 0.5 for n in sparsity.pruned_layers)
    out = _outputs(loaded)
    assert torch.equal(out, _outputs(full))
    dm = DigitsDataModule(batch_size=BATCH)
    dm.setup()
    y = next(iter(dm.val_dataloader()))[1]
    assert float((out.argmax(1) == y).float().mean()) > 0.5  # it works: far above chance (0.1)


def _untimed(x):
    """The permutation summary without its wall-clock seconds."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if "seconds" not in k}
    return [_untimed(v) for v in x] if isinstance(x, list) else x


@pytest.fixture(scope="module")
def uninterrupted_permuted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full_permuted")
    model, sparsity, _ = _fit(PACKAGES[0], d, EPOCHS, permute=True)
    return d, model, sparsity


@pytest.mark.parametrize("resume_epoch", [0, 1], ids=["ckpt_before_pruning", "ckpt_after_pruning"])
def test_resume_with_permutation_is_bit_identical(uninterrupted_permuted, tmp_path, resume_epoch, monkeypatch):
    d, full, full_sparsity = uninterrupted_permuted
    assert full_sparsity.permutation["groups_moved"] >= 1
    if resume_epoch == 1:  # the permuted weights are in the checkpoint: the search must not run again

        def no_search(*args, **kwargs):
            raise AssertionError("the permutation was searched again on resume")

        monkeypatch.setattr("qatsparse.callbacks.sparsity.search_channel_permutations", no_search)
    resumed, sparsity, [after_restore] = _fit(
        PACKAGES[0], tmp_path, EPOCHS, ckpt_path=d / f"epoch={resume_epoch}.ckpt", permute=True
    )
    assert after_restore in ([], None)
    assert sparsity.kept == full_sparsity.kept
    assert _untimed(sparsity.permutation) == _untimed(full_sparsity.permutation)
    a, b = full.state_dict(), resumed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert torch.equal(_outputs(full), _outputs(resumed))
