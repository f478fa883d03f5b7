"""The ``qatsparse`` command: LightningCLI (``fit``, ``validate``, ``test``, ``predict``)."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI


class QatsparseCLI(LightningCLI):
    """LightningCLI with any LightningModule/LightningDataModule given by ``class_path``.

    Example:
        ``qatsparse fit --config recipes/digits_int8_sparse.yaml``
    """


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``qatsparse`` console script."""
    QatsparseCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":  # pragma: no cover
    main()
