"""A small transformer classifier over the bundled digits: image rows (or patches) as tokens, PyTorch's own
``nn.TransformerEncoderLayer`` (``nn.MultiheadAttention`` inside), the model of the attention recipe."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from qatsparse.checkpointing import restore_structure
from qatsparse.examples.pretrained import mark_restored
from qatsparse.examples.steps import ClassificationSteps


class DigitsTransformer(ClassificationSteps, pl.LightningModule):
    """A transformer encoder classifier for small single-channel images that logs ``val_acc``.

    The image is cut into ``patch`` x ``patch`` patches (``patch=0``: one token per image row), each
    flattened and projected by ``embed`` (Linear) to ``d_model``, plus a learned position embedding;
    ``layers`` ``nn.TransformerEncoderLayer`` (pre-norm, GELU, ``batch_first``), a final LayerNorm, the mean
    over the tokens and a linear classifier ``fc``. Trained with AdamW and a one-cycle learning-rate schedule
    over the whole run (``trainer.estimated_stepping_batches``), so QAT sees the small learning rate it needs.

    Args:
        num_classes: number of classes.
        image_size: side of the square input images (sets ``example_input_array``).
        patch: side of a square patch token; 0 makes each image row a token.
        d_model: token width (a multiple of ``heads`` and of 4, for 2:4 along the input dimension).
        heads: attention heads.
        layers: encoder layers.
        ffn: width of the feed-forward hidden layer.
        dropout: dropout of the encoder layers.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        init_ckpt: start from these weights (a Lightning checkpoint or a plain state_dict), loaded when
            fit/validate/test/predict starts unless a checkpoint is restored (:mod:`qatsparse.examples.pretrained`).

    Example:
        >>> m = DigitsTransformer(); m(m.example_input_array).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 8,
        patch: int = 0,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ffn: int = 128,
        dropout: float = 0.1,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        init_ckpt: str | None = None,
    ) -> None:
        super().__init__()
        if patch and image_size % patch:
            raise ValueError(f"patch must divide image_size ({image_size}), got {patch}")
        self.save_hyperparameters()
        tokens, width = (image_size, image_size) if not patch else ((image_size // patch) ** 2, patch * patch)
        self.embed = nn.Linear(width, d_model)
        self.pos = nn.Parameter(torch.randn(1, tokens, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, ffn, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, num_classes)
        self.example_input_array = torch.zeros(1, 1, image_size, image_size)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` images -> ``(N, tokens, width)``: rows, or patches in row-major order."""
        p = self.hparams.patch
        if not p:
            return x.flatten(1, 2)  # (N, H, W): one token per row
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(self.tokens(x)) + self.pos)
        return self.fc(self.norm(h).mean(1))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=total, pct_start=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint taken after QAT started holds quantizer buffers: insert them first (docs/callbacks.md).
        restore_structure(self, checkpoint)
        mark_restored(self)  # init_ckpt is not loaded over a restored checkpoint
