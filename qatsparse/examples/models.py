"""A small residual CNN classifier, the model of the embedded default recipe."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from qatsparse.checkpointing import restore_structure
from qatsparse.examples.pretrained import mark_restored
from qatsparse.examples.steps import ClassificationSteps


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut, as in torchvision's ResNet."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResidualCNN(ClassificationSteps, pl.LightningModule):
    """A residual CNN for small single-channel images that logs ``val_acc``.

    Stem 3x3 conv, then residual stages of ``widths`` channels (each after the first halves the
    resolution), global average pooling and a linear classifier ``fc``. Trained with SGD + momentum
    and a cosine learning-rate schedule over the whole run (``trainer.estimated_stepping_batches``),
    so later stages such as QAT see the small learning rate they need.

    Args:
        num_classes: number of classes.
        in_channels: channels of the input images.
        widths: channels of each residual stage.
        lr: peak learning rate.
        weight_decay: SGD weight decay.
        image_size: side of the input images (sets ``example_input_array``).
        init_ckpt: start from these weights (a Lightning checkpoint or a plain state_dict), loaded when
            fit/validate/test/predict starts unless a checkpoint is restored (:mod:`qatsparse.examples.pretrained`).

    Example:
        >>> m = ResidualCNN(); m(m.example_input_array).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (32, 64),
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        image_size: int = 8,
        init_ckpt: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        widths = tuple(widths)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(c, w, stride=1 if i == 0 else 2), BasicBlock(w, w)))
            c = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, num_classes)
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=total, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint taken after QAT started holds quantizer buffers: insert the quantizers first so
        # that `load_from_checkpoint` restores them exactly (see docs/callbacks.md).
        restore_structure(self, checkpoint)
        mark_restored(self)  # init_ckpt is not loaded over a restored checkpoint
