"""A torchvision ResNet as a LightningModule: the model of the ImageFolder and CIFAR-10 recipes."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from qatsparse.checkpointing import restore_structure
from qatsparse.examples.pretrained import mark_restored
from qatsparse.examples.steps import ClassificationSteps


def build_resnet(arch: str, num_classes: int, cifar_stem: bool = False, weights: str | None = None) -> nn.Module:
    """A torchvision ResNet with a ``num_classes`` head; ``cifar_stem`` swaps the 7x7/2 conv + max-pool
    stem for a 3x3/1 conv (the usual choice for 32x32 images).

    Example:
        >>> build_resnet("resnet18", 10, cifar_stem=True).conv1.kernel_size
        (3, 3)
    """
    import torchvision

    resnets = [n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith(("resnet", "wide"))]
    if arch not in resnets:
        raise ValueError(f"arch must be a torchvision ResNet, one of {resnets}; got {arch!r}")
    if weights is None:
        net = torchvision.models.get_model(arch, num_classes=num_classes)
    else:
        try:
            net = torchvision.models.get_model(arch, weights=weights)
        except OSError as e:  # urllib's URLError is an OSError
            raise RuntimeError(
                f"could not download torchvision weights {weights!r} for {arch} ({e}); without internet, set "
                "weights: null and start from a local file with init_ckpt"
            ) from e
        if net.fc.out_features != num_classes:
            net.fc = nn.Linear(net.fc.in_features, num_classes)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


class ImageClassifier(ClassificationSteps, pl.LightningModule):
    """A torchvision ResNet classifier (``self.net``) trained with SGD + one-cycle, logging ``val_acc``.

    Args:
        arch: torchvision ResNet name (``resnet18``, ``resnet50``, ...).
        num_classes: number of classes; must equal the datamodule's ``num_classes`` where it has one.
        cifar_stem: 3x3 stride-1 first conv and no max-pool (for 32x32 images).
        image_size: side of the input images (sets ``example_input_array``).
        weights: torchvision weights name to start from (e.g. ``IMAGENET1K_V1``; downloads).
        init_ckpt: start from these weights (a Lightning checkpoint or a plain state_dict, e.g. a
            torchvision ``state_dict``), loaded when fit/validate/test/predict starts unless a checkpoint is restored.
        lr: peak learning rate.
        weight_decay: SGD weight decay.
        label_smoothing: cross-entropy label smoothing.
        warmup_pct: share of the steps spent warming the learning rate up.

    Example:
        >>> m = ImageClassifier(num_classes=10, cifar_stem=True, image_size=32)
        >>> m(m.example_input_array).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        cifar_stem: bool = False,
        image_size: int = 224,
        weights: str | None = None,
        init_ckpt: str | None = None,
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
        warmup_pct: float = 0.15,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_resnet(arch, num_classes, cifar_stem, weights)
        self.example_input_array = torch.zeros(1, 3, image_size, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        dm = self._trainer.datamodule if self._trainer is not None else None
        n = getattr(dm, "num_classes", None)
        if n is not None and n != self.hparams.num_classes:
            raise ValueError(
                f"model.num_classes={self.hparams.num_classes} but the data has {n} classes: "
                f"set --model.init_args.num_classes={n}"
            )

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(1)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=total, pct_start=self.hparams.warmup_pct
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_structure(self, checkpoint)  # QAT checkpoints: insert the quantizers before loading
        mark_restored(self)  # init_ckpt is not loaded over a restored checkpoint
