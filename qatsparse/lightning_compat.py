"""Both Lightning packages: ``pytorch_lightning`` and the unified ``lightning`` (``import lightning as L``).

They ship the same code under two names, so each package's classes are distinct types: an
``L.LightningModule`` is not a ``pytorch_lightning.LightningModule``. qatsparse's callbacks derive from
both packages' ``Callback`` (where ``lightning`` is installed), so either Trainer takes them, and every
identity check in qatsparse goes through the helpers below instead of one package's class.

Example:
    >>> import pytorch_lightning as pl
    >>> is_lightning_module(pl.LightningModule()), is_lightning_module(object())
    (True, False)
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as _pl

try:  # the unified package is optional
    import lightning.pytorch as _L
except ImportError:  # pragma: no cover - depends on the environment
    _L = None

#: The Lightning packages importable here (``pytorch_lightning`` first).
PACKAGES = tuple(p for p in (_pl, _L) if p is not None)
LIGHTNING_MODULES: tuple[type, ...] = tuple(p.LightningModule for p in PACKAGES)
DATAMODULES: tuple[type, ...] = tuple(p.LightningDataModule for p in PACKAGES)

if _L is not None:

    class Callback(_pl.Callback, _L.Callback):  # type: ignore[misc]
        """Base of qatsparse's callbacks: a ``Callback`` of both Lightning packages."""

else:  # pragma: no cover - depends on the environment

    class Callback(_pl.Callback):  # type: ignore[no-redef]
        """Base of qatsparse's callbacks: a ``pytorch_lightning.Callback``."""


def is_lightning_module(obj: Any) -> bool:
    """Whether ``obj`` is a LightningModule of either package."""
    return isinstance(obj, LIGHTNING_MODULES)


def overrides(obj: Any, method: str) -> bool:
    """Whether the LightningModule or LightningDataModule ``obj`` overrides ``method`` of its package's base.

    Example:
        >>> import pytorch_lightning as pl
        >>> overrides(pl.LightningDataModule(), "val_dataloader")
        False
    """
    for base in (*LIGHTNING_MODULES, *DATAMODULES):
        if isinstance(obj, base) and hasattr(base, method):
            return getattr(type(obj), method, None) is not getattr(base, method)
    return hasattr(obj, method)
