"""Small networks and data shared by the export/validation/report tests (no tests here)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

N_MOVES = 64


class BoardNet(pl.LightningModule):
    """Two inputs (board planes, side features), two outputs (policy logits, value in [-1, 1])."""

    def __init__(self, planes: int = 6, side: int = 5, width: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(planes, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        )  # fmt: skip
        self.policy_conv = nn.Conv2d(width, 2, 1)
        self.policy_fc = nn.Linear(2 * 8 * 8, N_MOVES)
        self.value_fc1 = nn.Linear(width + side, 32)
        self.value_fc2 = nn.Linear(32, 1)
        self.example_input_array = (torch.zeros(1, planes, 8, 8), torch.zeros(1, side))

    def forward(self, planes: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(planes)
        policy = self.policy_fc(torch.flatten(F.relu(self.policy_conv(h)), 1))
        v = torch.cat([F.adaptive_avg_pool2d(h, 1).flatten(1), side], 1)
        value = torch.tanh(self.value_fc2(F.relu(self.value_fc1(v))))
        return policy, value

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (planes, side), (move, value) = batch
        p, v = self(planes, side)
        return F.cross_entropy(p, move) + F.mse_loss(v.squeeze(1), value)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class BoardData(Dataset):
    """Random positions with a learnable policy target and a value target: ((planes, side), (move, value))."""

    def __init__(self, n: int = 96, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.planes = torch.randn(n, 6, 8, 8, generator=g)
        self.side = torch.randn(n, 5, generator=g)
        self.move = self.planes[:, 0].flatten(1).argmax(1)
        self.value = torch.tanh(self.side[:, 0])

    def __len__(self) -> int:
        return len(self.move)

    def __getitem__(self, i: int) -> Any:
        return (self.planes[i], self.side[i]), (self.move[i], self.value[i])


def board_loader(n: int = 96, batch_size: int = 32, seed: int = 0) -> DataLoader:
    return DataLoader(BoardData(n, seed), batch_size=batch_size)


def trained_board_net(steps: int = 30) -> BoardNet:
    """A BoardNet fitted a little (BatchNorm statistics and weights away from the init), in eval mode."""
    torch.manual_seed(0)
    net = BoardNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = board_loader(96, 32)
    for _ in range(steps // len(loader) + 1):
        for batch in loader:
            opt.zero_grad()
            net.training_step(batch, 0).backward()
            opt.step()
    return net.eval()
