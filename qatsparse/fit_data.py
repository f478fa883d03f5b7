"""``FitData``: one training and one validation batch of a fit, read once for every preflight check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qatsparse.loaders import find_val_dataloader, peek


class FitData:
    """One training and one validation batch of a fit, read once (lazily) for every check.

    The training batch is read the way calibration reads it (a separate pass, samplers' generators and the
    RNG left as they were, moved to the device); the validation loader is found even when the validation
    loop does not run (:func:`qatsparse.loaders.find_val_dataloader`).
    """

    def __init__(self, trainer: Any, pl_module: nn.Module) -> None:
        self.trainer, self.module = trainer, pl_module
        self._cache: dict[str, Any] = {}

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device

    def train_batch(self) -> Any:
        def read() -> Any:
            from qatsparse.loaders import train_dataloader

            with torch.random.fork_rng(devices=self._cuda()):
                batch = peek(train_dataloader(self.trainer))
            return self.trainer.strategy.batch_to_device(batch)

        return self._once("train_batch", read)

    def val_loader(self) -> Any:
        return self._once("val_loader", lambda: find_val_dataloader(self.trainer))

    def val_batch(self) -> Any:
        def read() -> Any:
            loader = self.val_loader()
            if loader is None:
                raise ValueError("no validation data")
            with torch.random.fork_rng(devices=self._cuda()):
                batch = peek(loader)
            return self.trainer.strategy.batch_to_device(batch)

        return self._once("val_batch", read)

    def _cuda(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []
