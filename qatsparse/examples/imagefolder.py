"""A folder of images, one sub-folder per class (torchvision's ImageFolder), as a LightningDataModule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from qatsparse.examples.digits import EpochSeededSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LAYOUT = (
    "expected ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg, or ROOT/<class>/*.jpg "
    "(then val_fraction of the images is held out)"
)


def image_transforms(image_size: int, train: bool, augment: bool, mean: Sequence[float], std: Sequence[float]) -> Any:
    """Training: random resized crop + flip (``augment``); evaluation: resize to 8/7 then centre crop."""
    from torchvision import transforms as T

    if train and augment:
        geometry = [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(round(image_size * 8 / 7), antialias=True), T.CenterCrop(image_size)]
    return T.Compose([T.Lambda(lambda im: im.convert("RGB")), *geometry, T.ToTensor(), T.Normalize(mean, std)])


class ImageFolderDataModule(pl.LightningDataModule):
    """Images in class sub-folders; ``root`` is required and checked when the datamodule is built.

    Args:
        root: the image folder (``train/`` + ``val/`` sub-folders, or class sub-folders directly).
        image_size: side of the square crops fed to the model.
        batch_size: training and validation batch size.
        val_fraction: share held out for validation when ``root`` has no ``train/``/``val/`` split.
        num_workers: DataLoader workers.
        seed: seed of the split and of the shuffling.
        augment: random crops and flips for training.
        mean / std: normalisation (ImageNet's by default).

    Example:
        >>> dm = ImageFolderDataModule(root="path/to/images")  # doctest: +SKIP
        >>> dm.setup("fit"); dm.num_classes  # doctest: +SKIP
        5
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 4,
        seed: int = 0,
        augment: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if root is None or str(root).strip() == "":
            raise ValueError(
                f"data.root is required: set `--data.init_args.root PATH` (or `root:` in the recipe); {_LAYOUT}"
            )
        if not Path(root).is_dir():
            raise FileNotFoundError(f"data.root {str(root)!r} is not a folder; {_LAYOUT}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.classes: list[str] = []

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) or None

    def _folder(self, path: Path, train: bool) -> Any:
        from torchvision.datasets import ImageFolder

        h = self.hparams
        try:
            return ImageFolder(str(path), transform=image_transforms(h.image_size, train, h.augment, h.mean, h.std))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no images found under {str(path)!r} ({e}); {_LAYOUT}") from e

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        root = Path(self.hparams.root)
        if (root / "train").is_dir() and (root / "val").is_dir():
            train, val = self._folder(root / "train", True), self._folder(root / "val", False)
            if train.classes != val.classes:
                raise ValueError(f"train/ and val/ have different classes: {train.classes} vs {val.classes}")
            self.train_set, self.val_set = train, val
        else:
            train, val = self._folder(root, True), self._folder(root, False)
            g = torch.Generator().manual_seed(self.hparams.seed)
            perm = torch.randperm(len(train), generator=g).tolist()
            n_val = max(1, round(len(perm) * self.hparams.val_fraction))
            self.train_set, self.val_set = Subset(train, perm[n_val:]), Subset(val, perm[:n_val])
        self.classes = list(train.classes)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            sampler=EpochSeededSampler(len(self.train_set), seed=self.hparams.seed),
            drop_last=len(self.train_set) >= self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
