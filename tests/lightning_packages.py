"""The example model and data on either Lightning package, for the tests that run under both (no tests here).

``pytorch_lightning`` uses qatsparse's examples as they are. For the unified ``lightning`` package a user
writes ``class Net(L.LightningModule)``; the twins below are exactly that: the same layers (built by the
example's own constructor, so a seed gives the same weights), steps, optimizer and checkpoint hook, on
``lightning.pytorch``'s base classes.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from qatsparse.examples import DigitsDataModule, ResidualCNN
from qatsparse.examples.steps import ClassificationSteps

#: Parameter values of ``@pytest.mark.parametrize("package", PACKAGES)``.
PACKAGES = ["pytorch_lightning", "lightning"]


def package(name: str) -> ModuleType:
    """``pytorch_lightning``, or ``lightning.pytorch`` (skips the test where ``lightning`` is not installed)."""
    if name == "lightning":
        pytest.importorskip("lightning")
        return importlib.import_module("lightning.pytorch")
    return importlib.import_module(name)


def _twins(L: ModuleType) -> tuple[type, type]:
    class ResidualCNNTwin(ClassificationSteps, L.LightningModule):
        """qatsparse.examples.ResidualCNN on ``lightning.pytorch.LightningModule``."""

        forward = ResidualCNN.forward
        configure_optimizers = ResidualCNN.configure_optimizers
        on_load_checkpoint = ResidualCNN.on_load_checkpoint

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
            layers = ResidualCNN(num_classes, in_channels, widths, lr, weight_decay, image_size, init_ckpt)
            for name, child in layers.named_children():
                self.add_module(name, child)
            self.example_input_array = layers.example_input_array

    class DigitsTwin(L.LightningDataModule):
        """qatsparse.examples.DigitsDataModule on ``lightning.pytorch.LightningDataModule``."""

        num_classes = DigitsDataModule.num_classes
        setup = DigitsDataModule.setup
        train_dataloader = DigitsDataModule.train_dataloader
        val_dataloader = DigitsDataModule.val_dataloader

        def __init__(
            self,
            batch_size: int = 64,
            val_fraction: float = 0.2,
            image_size: int = 8,
            seed: int = 0,
            num_workers: int = 0,
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.train_set = self.val_set = None

    return ResidualCNNTwin, DigitsTwin


_CACHE: dict[str, tuple[type, type]] = {}


def classes(name: str) -> tuple[ModuleType, type, type]:
    """(the package, its ResidualCNN, its DigitsDataModule)."""
    pkg = package(name)
    if name == "pytorch_lightning":
        return pkg, ResidualCNN, DigitsDataModule
    if name not in _CACHE:
        _CACHE[name] = _twins(pkg)
    return pkg, *_CACHE[name]
