"""A two-input (board planes + auxiliary features), two-output (policy logits, value) network, the shape
of board-game engines, with a generated-data DataModule (nothing downloaded).

Batches are ``((board, aux), (policy_target, value_target))``: qatsparse reads the first element as the
model's inputs and the second as one target per output (see :mod:`qatsparse.batches`), so the export
callback exports both inputs, validates both outputs (top-1 accuracy of the policy, agreement of both)
and names them with ``input_names``/``output_names``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qatsparse.checkpointing import restore_structure
from qatsparse.examples.digits import EpochSeededSampler
from qatsparse.examples.models import BasicBlock
from qatsparse.examples.pretrained import mark_restored, setup_init_ckpt


class TwoHeadNet(pl.LightningModule):
    """Residual trunk over the board planes (the auxiliary features added per channel after the stem), a
    policy head (logits over ``board_size**2`` moves) and a value head (``tanh``, shape ``(N, 1)``).

    Loss: cross-entropy of the policy plus ``value_weight`` times the value's mean squared error.
    Logs ``val_policy_acc``, ``val_value_mse`` and ``val_loss``.

    Args:
        board_planes: input planes of the board.
        board_size: side of the board.
        aux_features: length of the auxiliary feature vector.
        width: channels of the trunk.
        blocks: residual blocks of the trunk.
        lr: peak learning rate (AdamW, one-cycle).
        weight_decay: AdamW weight decay.
        value_weight: weight of the value loss.
        init_ckpt: start from these weights (a Lightning checkpoint or a plain state_dict).

    Example:
        >>> m = TwoHeadNet(); policy, value = m(*m.example_input_array)
        >>> tuple(policy.shape), tuple(value.shape)
        ((1, 64), (1, 1))
    """

    def __init__(
        self,
        board_planes: int = 16,
        board_size: int = 8,
        aux_features: int = 8,
        width: int = 32,
        blocks: int = 2,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        value_weight: float = 1.0,
        init_ckpt: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        cells = board_size * board_size
        self.stem = nn.Sequential(nn.Conv2d(board_planes, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.aux = nn.Linear(aux_features, width)
        self.trunk = nn.Sequential(*(BasicBlock(width, width) for _ in range(blocks)))
        self.policy_conv = nn.Sequential(nn.Conv2d(width, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.policy_fc = nn.Linear(16 * cells, cells)
        self.value_conv = nn.Sequential(nn.Conv2d(width, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.value_fc1 = nn.Linear(16 * cells, 64)
        self.value_fc2 = nn.Linear(64, 1)
        self.example_input_array = (
            torch.zeros(1, board_planes, board_size, board_size),
            torch.zeros(1, aux_features),
        )

    def forward(self, board: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.stem(board) + self.aux(aux)[:, :, None, None])
        x = self.trunk(x)
        policy = self.policy_fc(torch.flatten(self.policy_conv(x), 1))
        value = torch.tanh(self.value_fc2(F.relu(self.value_fc1(torch.flatten(self.value_conv(x), 1)))))
        return policy, value

    def on_fit_start(self) -> None:
        setup_init_ckpt(self, self.hparams.init_ckpt)  # after a restored ckpt_path: skipped

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def _losses(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        (board, aux), (move, value_t) = batch
        policy, value = self(board, aux)
        return F.cross_entropy(policy, move), F.mse_loss(value, value_t), policy, move

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        p_loss, v_loss, _, _ = self._losses(batch)
        loss = p_loss + self.hparams.value_weight * v_loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        p_loss, v_loss, policy, move = self._losses(batch)
        self.log("val_loss", p_loss + self.hparams.value_weight * v_loss, prog_bar=True)
        self.log("val_policy_acc", (policy.argmax(1) == move).float().mean(), prog_bar=True)
        self.log("val_value_mse", v_loss)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=total, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_structure(self, checkpoint)  # QAT checkpoints: insert the quantizers before loading
        mark_restored(self)  # init_ckpt is not loaded over a restored checkpoint


#: The eight king-move directions (row, column) that the first eight aux features choose between.
_DIRECTIONS = torch.tensor([[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 0], [1, 1]])


def generate_positions(
    n: int, board_planes: int = 16, board_size: int = 8, aux_features: int = 8, seed: int = 0, task_seed: int = 1234
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``n`` random positions and their targets from a fixed rule (its value weights seeded by ``task_seed``).

    Plane 0 holds one "king" on a random cell, the other planes sparse random pieces; the aux features
    are standard normal. The best move is two cells from the king in the direction picked by the
    largest of the first eight aux features (clamped to the board): a local feature (where the king
    is) combined with a global one (the aux vector), as in board-game policies. The value is ``tanh``
    of a fixed linear function of the plane densities and the aux features.

    Example:
        >>> (b, a), (m, v) = generate_positions(4); tuple(b.shape), tuple(a.shape), m.dtype, tuple(v.shape)
        ((4, 16, 8, 8), (4, 8), torch.int64, (4, 1))
    """
    if board_planes < 2 or aux_features < 1:
        raise ValueError(f"need board_planes >= 2 and aux_features >= 1, got {board_planes}, {aux_features}")
    g = torch.Generator().manual_seed(seed)
    board = (torch.rand(n, board_planes, board_size, board_size, generator=g) < 0.1).float()
    cells = board_size * board_size
    king = torch.randint(0, cells, (n,), generator=g)
    board[:, 0] = F.one_hot(king, cells).float().view(n, board_size, board_size)
    aux = torch.randn(n, aux_features, generator=g)
    step = _DIRECTIONS[aux[:, :8].argmax(1) % len(_DIRECTIONS)] * 2
    row = (king // board_size + step[:, 0]).clamp(0, board_size - 1)
    col = (king % board_size + step[:, 1]).clamp(0, board_size - 1)
    move = row * board_size + col
    t = torch.Generator().manual_seed(task_seed)
    v_board, v_aux = torch.randn(board_planes, generator=t), torch.randn(aux_features, generator=t)
    value = torch.tanh(board[:, 1:].mean(dim=(2, 3)) @ v_board[1:] * 3.0 + aux @ v_aux * 0.3).unsqueeze(1)
    return (board, aux), (move, value)


class TwoHeadDataModule(pl.LightningDataModule):
    """Generated positions for :class:`TwoHeadNet` (train and validation sets drawn with different seeds).

    Args:
        n_train: training positions.
        n_val: validation positions.
        board_planes / board_size / aux_features: input shapes (match the model's).
        batch_size: training and validation batch size.
        seed: seed of the positions and of the shuffling (the teacher rule is fixed).
        num_workers: DataLoader workers.

    Example:
        >>> dm = TwoHeadDataModule(n_train=64, n_val=32, batch_size=16); dm.setup("fit")
        >>> (board, aux), (move, value) = next(iter(dm.train_dataloader())); tuple(board.shape)
        (16, 16, 8, 8)
    """

    def __init__(
        self,
        n_train: int = 8192,
        n_val: int = 2048,
        board_planes: int = 16,
        board_size: int = 8,
        aux_features: int = 8,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if n_train < batch_size or n_val < 1:
            raise ValueError(f"need n_train >= batch_size and n_val >= 1, got {n_train}, {batch_size}, {n_val}")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        shape = {"board_planes": h.board_planes, "board_size": h.board_size, "aux_features": h.aux_features}
        (b, a), (m, v) = generate_positions(h.n_train, seed=h.seed, **shape)
        self.train_set = TensorDataset(b, a, m, v)
        (b, a), (m, v) = generate_positions(h.n_val, seed=h.seed + 1_000_003, **shape)
        self.val_set = TensorDataset(b, a, m, v)

    @staticmethod
    def _collate(items: list[tuple[torch.Tensor, ...]]) -> Any:
        board, aux, move, value = (torch.stack(t) for t in zip(*items))
        return (board, aux), (move, value)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            sampler=EpochSeededSampler(len(self.train_set), seed=self.hparams.seed),
            drop_last=True,
            collate_fn=self._collate,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(
            self.val_set,
            batch_size=self.hparams.batch_size,
            collate_fn=self._collate,
            num_workers=self.hparams.num_workers,
        )
