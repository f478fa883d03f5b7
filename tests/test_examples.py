"""The example models and datamodules: init_ckpt, the two-head task, the image folder layouts."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from qatsparse.examples import (
    DigitsDataModule,
    ImageClassifier,
    ImageFolderDataModule,
    ResidualCNN,
    TwoHeadDataModule,
    TwoHeadNet,
    generate_positions,
    load_init_ckpt,
)


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResidualCNN trained for a few steps, saved as a Lightning checkpoint and as a plain state_dict."""
    tmp = tmp_path_factory.mktemp("init")
    pl.seed_everything(0)
    model, dm = ResidualCNN(widths=(8, 16)), DigitsDataModule(batch_size=64)
    trainer = _trainer(max_steps=8, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp / "lightning.ckpt")
    torch.save(model.state_dict(), tmp / "plain.pt")
    return model, tmp


@pytest.mark.parametrize("file", ["lightning.ckpt", "plain.pt"])
def test_init_ckpt_is_the_starting_point_of_validate_and_fit(trained, file):
    model, tmp = trained
    fresh = ResidualCNN(widths=(8, 16), init_ckpt=str(tmp / file))
    assert not torch.equal(fresh.fc.weight, model.fc.weight)
    dm = DigitsDataModule(batch_size=64)
    got = _trainer().validate(fresh, datamodule=dm, verbose=False)[0]["val_acc"]
    want = _trainer().validate(model, datamodule=dm, verbose=False)[0]["val_acc"]
    assert got == pytest.approx(want, abs=1e-7)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_init_ckpt_is_not_applied_when_the_trainer_restores_a_checkpoint(trained, tmp_path):
    model, tmp = trained
    other = ResidualCNN(widths=(8, 16))  # different random weights, saved as the "init" file
    torch.save(other.state_dict(), tmp_path / "other.pt")
    fresh = ResidualCNN(widths=(8, 16), init_ckpt=str(tmp_path / "other.pt"))
    _trainer().validate(
        fresh, datamodule=DigitsDataModule(batch_size=64), ckpt_path=str(tmp / "lightning.ckpt"), verbose=False
    )
    assert torch.equal(fresh.fc.weight, model.fc.weight)  # the checkpoint won, init_ckpt was skipped
    assert not getattr(fresh, "_qatsparse_init_loaded", False)


def test_init_ckpt_errors_name_the_problem(trained, tmp_path):
    _, tmp = trained
    with pytest.raises(ValueError, match=r"does not fit ResidualCNN: .*shape mismatch"):
        load_init_ckpt(ResidualCNN(widths=(16, 32)), tmp / "plain.pt")
    qat = {**torch.load(tmp / "plain.pt"), "stem.0.input_quantizer.amax": torch.tensor(1.0)}
    torch.save(qat, tmp_path / "qat.pt")
    with pytest.raises(ValueError, match="quantization-aware-trained"):
        load_init_ckpt(ResidualCNN(widths=(8, 16)), tmp_path / "qat.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_init_ckpt(ResidualCNN(), tmp_path / "missing.ckpt")


def test_a_torchvision_state_dict_loads_into_image_classifier(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")  # keys without the `net.` prefix
    model = ImageClassifier(num_classes=10, image_size=32)
    load_init_ckpt(model, tmp_path / "resnet18.pth")
    assert torch.equal(model.net.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    with pytest.raises(ValueError, match="arch must be a torchvision ResNet"):
        ImageClassifier(arch="vgg11")


def test_two_head_rule_and_shapes():
    (board, aux), (move, value) = generate_positions(256, seed=3)
    assert board[:, 0].flatten(1).sum(1).eq(1).all()  # one king each
    king = board[:, 0].flatten(1).argmax(1)
    dist = torch.maximum((move // 8 - king // 8).abs(), (move % 8 - king % 8).abs())
    assert dist.le(2).all() and dist.eq(2).float().mean() > 0.5  # two cells away unless clamped at an edge
    assert value.abs().le(1).all()
    (b2, _), (m2, _) = generate_positions(256, seed=3)
    assert torch.equal(board, b2) and torch.equal(move, m2)
    policy, v = TwoHeadNet()(board[:5], aux[:5])
    assert policy.shape == (5, 64) and v.shape == (5, 1)
    dm = TwoHeadDataModule(n_train=64, n_val=16, batch_size=16)
    dm.setup("fit")
    (b, a), (m, val) = next(iter(dm.val_dataloader()))
    assert b.shape == (16, 16, 8, 8) and a.shape == (16, 8) and m.shape == (16,) and val.shape == (16, 1)


def _pngs(root, classes, n):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 20, 3), i * 10, dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_layouts_and_errors(tmp_path):
    _pngs(tmp_path / "split" / "train", ["a", "b"], 3)
    _pngs(tmp_path / "split" / "val", ["a", "b"], 2)
    dm = ImageFolderDataModule(root=str(tmp_path / "split"), image_size=16, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), dm.num_classes) == (6, 4, 2)
    x, _y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 16, 16)
    _pngs(tmp_path / "flat", ["a", "b", "c"], 4)
    dm = ImageFolderDataModule(root=str(tmp_path / "flat"), image_size=16, val_fraction=0.25, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), dm.num_classes) == (9, 3, 3)
    with pytest.raises(ValueError, match=r"data\.root is required"):
        ImageFolderDataModule()
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ImageFolderDataModule(root=str(tmp_path / "nope"))
