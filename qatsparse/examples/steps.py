"""The training and validation steps the example classifiers share."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qatsparse.examples.pretrained import setup_init_ckpt


class ClassificationSteps:
    """Mixin for a ``LightningModule`` classifier on ``(x, y)`` batches: cross-entropy training (with
    ``hparams.label_smoothing`` when set), ``val_loss``/``val_acc`` logging, and ``init_ckpt`` loading
    at the start of every stage (skipped after a restored ``ckpt_path``).

    Example:
        >>> class Net(ClassificationSteps, pl.LightningModule): ...  # doctest: +SKIP
    """

    def on_fit_start(self) -> None:
        setup_init_ckpt(self, self.hparams.init_ckpt)

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=float(self.hparams.get("label_smoothing", 0.0)))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
