"""CIFAR-10 as a LightningDataModule: downloaded by torchvision where the machine has internet."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from qatsparse.examples.digits import EpochSeededSampler

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def cifar10_dataset_class() -> type:
    """The dataset class used (torchvision's ``CIFAR10``); one place to swap it, e.g. in tests."""
    from torchvision.datasets import CIFAR10

    return CIFAR10


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 (50,000 training and 10,000 test images, 32x32, 10 classes); the test split validates.

    ``prepare_data`` downloads the archive to ``root`` when ``download`` is true and it is not there
    yet. Where nothing can be downloaded the error says where to put the files instead.

    Args:
        root: folder holding (or receiving) ``cifar-10-batches-py``.
        download: download when missing.
        batch_size: training and validation batch size.
        num_workers: DataLoader workers.
        augment: random crop (padding 4) and horizontal flip for training.
        seed: seed of the shuffling.

    Example:
        >>> dm = CIFAR10DataModule(root="data/cifar10")  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
    """

    num_classes = 10

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = True,
        batch_size: int = 128,
        num_workers: int = 4,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _dataset(self, train: bool, transform: Any = None, download: bool = False) -> Any:
        root = self.hparams.root
        try:
            return cifar10_dataset_class()(root, train=train, transform=transform, download=download)
        except OSError as e:  # urllib's URLError and socket errors are OSErrors
            raise RuntimeError(
                f"could not download CIFAR-10 to {root!r} ({e}). Without internet, download "
                f"{CIFAR10_URL} elsewhere, extract it into {root!r} (giving {root}/cifar-10-batches-py/) "
                "and set data.init_args.download: false"
            ) from e
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
            raise RuntimeError(
                f"CIFAR-10 is not in {root!r} ({e}). Set data.init_args.download: true on a machine with "
                f"internet, or extract {CIFAR10_URL} into {root!r}"
            ) from e

    def prepare_data(self) -> None:
        for train in (True, False):
            self._dataset(train, download=self.hparams.download)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        from torchvision import transforms as T

        norm = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.hparams.augment else []
        self.train_set = self._dataset(True, T.Compose([*aug, *norm]))
        self.val_set = self._dataset(False, T.Compose(norm))

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            sampler=EpochSeededSampler(len(self.train_set), seed=self.hparams.seed),
            drop_last=True,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
