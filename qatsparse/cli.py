"""The ``qatsparse`` command: LightningCLI's ``fit``/``validate``/``test``/``predict`` plus ``export``,
``bench`` and ``recipes``.

``--config`` takes a path or the name of a shipped recipe (``qatsparse recipes`` lists them), and can
be given several times (later files override earlier ones, LightningCLI's convention). Every recipe
holds a ``version:`` (see :data:`RECIPE_VERSIONS`). A misspelt key or callback argument fails while
the config is parsed -- before anything is built or trained -- with the valid names and the closest one.

* ``qatsparse export --config X --ckpt_path Y`` rebuilds the model and data from the config, loads the
  checkpoint (QAT checkpoints included) and exports, builds and validates with the config's
  ``TensorRTExport`` settings.
* ``qatsparse validate --config X --ckpt_path Y`` runs Lightning's validation loop; with ``--onnx P``,
  ``--engine E`` or ``--artifacts true`` it validates existing artifacts against the checkpoint instead.
* ``qatsparse bench --config X [--ckpt_path Y] [--batch_sizes [1,32]]`` times every backend.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from torch import nn

from qatsparse.cli_parser import QatsparseArgumentParser, error_hints
from qatsparse.gate import enforce_gate
from qatsparse.lightning_compat import is_lightning_module, overrides
from qatsparse.progress import progress_for
from qatsparse.recipe_configs import (
    RECIPE_VERSIONS,
    RECIPES_DIR,
    RecipeVersionError,
    list_recipes,
    print_recipes,
    recipe_description,
    recipe_paths,
    recipe_version,
    resolve_config,
    resolve_config_args,
)
from qatsparse.restore import RestoredRun
from qatsparse.restore import restore_run as _restore_run

__all__ = [
    "RECIPES_DIR",
    "RECIPE_VERSIONS",
    "CLITrainer",
    "QatsparseArgumentParser",
    "QatsparseCLI",
    "RecipeVersionError",
    "error_hints",
    "list_recipes",
    "main",
    "print_recipes",
    "recipe_description",
    "recipe_paths",
    "recipe_version",
    "resolve_config",
    "resolve_config_args",
    "restore_run",
    "run_cli",
]


# ---------------------------------------------------------------------------------------- commands
def _callback(callbacks: Sequence[Any], cls: type) -> Any:
    return next((cb for cb in callbacks if isinstance(cb, cls)), None) or cls()


def restore_run(model: nn.Module, ckpt_path: str | Path | None, callbacks: Sequence[Any] = ()) -> RestoredRun:
    """:func:`qatsparse.restore.restore_run` with the config's callbacks (defaults where it has none)."""
    from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity

    return _restore_run(
        model,
        ckpt_path,
        _callback(callbacks, TensorRTExport),
        _callback(callbacks, TwoFourSparsity),
        _callback(callbacks, QuantizationAwareTraining),
    )


def _val_loader(datamodule: pl.LightningDataModule | None, model: nn.Module) -> Any:
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("validate")
        return datamodule.val_dataloader()
    if is_lightning_module(model) and overrides(model, "val_dataloader"):
        return model.val_dataloader()
    raise ValueError("no validation data: give the config a `data:` section (a datamodule with val_dataloader())")


def _export_settings(callbacks: Sequence[Any], dirpath: str | None) -> tuple[Any, str]:
    from qatsparse import TensorRTExport

    cb = _callback(callbacks, TensorRTExport)
    settings = cb.settings
    if dirpath is not None:
        settings.dirpath = Path(dirpath)
    return settings, cb.on_fail


class CLITrainer(pl.Trainer):
    """The Trainer of the ``qatsparse`` command: Lightning's, plus ``export`` and ``bench`` methods and a
    ``validate`` that can also re-validate exported artifacts. Its methods' arguments are the
    subcommands' options (LightningCLI reads the signatures).

    Example:
        >>> trainer = CLITrainer(logger=False)  # doctest: +SKIP
        >>> trainer.export(model, datamodule=dm, ckpt_path="last.ckpt")  # doctest: +SKIP
    """

    def validate(  # type: ignore[override]
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: pl.LightningDataModule | None = None,
        weights_only: bool | None = None,
        onnx: str | None = None,
        engine: str | None = None,
        artifacts: bool = False,
    ) -> Any:
        """Run Lightning's validation loop; with --onnx/--engine/--artifacts, re-validate exported artifacts.

        Artifact validation runs the ONNX file and/or TensorRT engine on the validation data and compares
        them with the checkpoint's model and its dense reference (rewriting ``report.*`` in ``dirpath``). On a
        TensorRT machine, ``--engine dirpath/tensorrt/model.plan`` validates the engine the hand-off bundle's
        ``build.sh`` built: the report gets a ``tensorrt`` row.

        Args:
            onnx: ONNX file to validate (artifact validation).
            engine: TensorRT engine to validate (artifact validation).
            artifacts: validate the artifacts in the config's ``TensorRTExport.dirpath``.
        """
        if onnx is None and engine is None and not artifacts:
            kwargs = {"weights_only": weights_only} if weights_only is not None else {}
            return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, **kwargs)
        from qatsparse.pipeline import validate_artifacts

        if model is None:
            raise ValueError("artifact validation needs a model (the config's `model:`)")
        settings, on_fail = _export_settings(self.callbacks, None)
        if onnx is None and engine is None:
            onnx = str(settings.dirpath / "model.onnx")
            plan = settings.dirpath / "model.plan"
            engine = str(plan) if plan.is_file() else None
        run = restore_run(model, ckpt_path, self.callbacks)
        loader = dataloaders if dataloaders is not None else _val_loader(datamodule, model)
        report = validate_artifacts(
            run.model,
            run.reference,
            loader,
            settings,
            onnx_path=onnx,
            engine_path=engine,
            pruned_layers=run.pruned_layers,
            skipped_layers=run.skipped_layers,
            quantization=run.quantization,
            progress=progress_for(self),
        )
        enforce_gate(report, on_fail)
        return report

    def export(
        self,
        model: pl.LightningModule,
        ckpt_path: str,
        datamodule: pl.LightningDataModule | None = None,
        dirpath: str | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Export a checkpoint: ONNX, TensorRT engine where available, validation and report.

        Args:
            ckpt_path: Lightning checkpoint (or plain state_dict) of the trained model, e.g. the
                ``model.ckpt`` that ``TensorRTExport`` saves in its ``dirpath`` before exporting.
            dirpath: output folder (default: the config's ``TensorRTExport.dirpath``).
            weights_only: ``torch.load(weights_only=...)`` of ``ckpt_path`` (default False: the checkpoint holds
                callback states). Also makes the ``config.yaml`` a ``fit`` saved usable here as it is.
        """
        from qatsparse import TensorRTExport

        cb = _callback(self.callbacks, TensorRTExport)
        if dirpath is not None:
            cb.settings.dirpath = Path(dirpath)
        loader = _val_loader(datamodule, model)
        return cb.export_checkpoint(
            model, ckpt_path, loader, weights_only=bool(weights_only), progress=progress_for(self)
        )

    def bench(
        self,
        model: pl.LightningModule,
        ckpt_path: str | None = None,
        datamodule: pl.LightningDataModule | None = None,
        batch_sizes: list[int] = [1, 32, 256],  # noqa: B006 -- read by LightningCLI as the default
        onnx: str | None = None,
        engine: str | None = None,
        device: str | None = None,
        output: str | None = None,
    ) -> dict[str, Any]:
        """Time every backend of a model (PyTorch, ONNX Runtime, TensorRT where available) per batch size.

        Args:
            ckpt_path: checkpoint to load first (default: the model as configured).
            batch_sizes: batch sizes to time.
            onnx: ONNX file to time with ONNX Runtime.
            engine: TensorRT engine to time.
            device: ``cpu`` or ``cuda`` (default: CUDA where available).
            output: also write the result as JSON to this file.
        """
        from qatsparse.batches import example_inputs
        from qatsparse.benchmark import benchmark, format_table

        run = restore_run(model, ckpt_path, self.callbacks)
        loader = None if getattr(model, "example_input_array", None) is not None else _val_loader(datamodule, model)
        inputs = example_inputs(run.model, loader)
        result = benchmark(
            run.model, inputs, batch_sizes=tuple(batch_sizes), onnx_path=onnx, engine_path=engine, device=device
        )
        print(format_table(result))
        if output is not None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(result, indent=2, default=str))
        return result


# ---------------------------------------------------------------------------------------- CLI
class QatsparseCLI(LightningCLI):
    """LightningCLI with any LightningModule/LightningDataModule given by ``class_path``, the ``export`` and
    ``bench`` subcommands, recipe names for ``--config`` and a checked ``version`` key.

    Example:
        ``qatsparse fit --config digits_int8_sparse``
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "export": {"model", "datamodule"},
            "bench": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--version",
            type=recipe_version,
            default=RECIPE_VERSIONS[-1],
            help=f"Recipe format version; supported: {list(RECIPE_VERSIONS)}.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        self.config = parser.parse_args(resolve_config_args(argv))


def run_cli(args: list[str] | None = None) -> QatsparseCLI | None:
    """Run the ``qatsparse`` command on ``args`` (default ``sys.argv[1:]``) and return the CLI object
    (its ``trainer``, ``model``, ``datamodule``); None for ``qatsparse recipes``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["recipes"]:
        print_recipes()
        return None
    return QatsparseCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=CLITrainer,
        parser_class=QatsparseArgumentParser,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "qatsparse: 2:4 sparsity + INT8/FP16 QAT + ONNX/TensorRT export and validation. "
            "`qatsparse recipes` lists the shipped recipes."
        },
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``qatsparse`` console script (see :func:`run_cli`)."""
    run_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
