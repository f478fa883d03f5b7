"""The embedded default data: scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

from collections.abc import Iterator

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset


class EpochSeededSampler(Sampler[int]):
    """Random permutation drawn from ``seed + epoch``: the data order of an epoch does not depend on
    the global RNG, so a run resumed at an epoch boundary sees the same batches as an uninterrupted one.

    Lightning calls ``set_epoch`` on every sampler that has it at the start of each training epoch.

    Example:
        >>> s = EpochSeededSampler(5, seed=0); s.set_epoch(1); sorted(s) == list(range(5))
        True
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 1,797 bundled 8x8 digit images, split train/val with a fixed seed and normalised.

    Args:
        batch_size: training and validation batch size.
        val_fraction: share of the images held out for validation.
        image_size: side of the (bilinearly upsampled) images; 8 keeps the native resolution.
        seed: seed of the split and of the shuffling.
        num_workers: DataLoader workers.

    Example:
        >>> dm = DigitsDataModule(batch_size=32); dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader())); tuple(x.shape), y.dtype
        ((32, 1, 8, 8), torch.int64)
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        image_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the native size), got {image_size}")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        if self.hparams.image_size != 8:
            x = F.interpolate(x, size=self.hparams.image_size, mode="bilinear", align_corners=False)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.hparams.seed))
        n_val = round(len(x) * self.hparams.val_fraction)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        mean, std = x[train_idx].mean(), x[train_idx].std()
        x = (x - mean) / std
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        sampler = EpochSeededSampler(len(self.train_set), seed=self.hparams.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
