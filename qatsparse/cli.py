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

import difflib
import importlib
import inspect
import json
import re
import sys
from argparse import ArgumentTypeError
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from torch import nn

from qatsparse.gate import enforce_gate
from qatsparse.lightning_compat import is_lightning_module, overrides
from qatsparse.progress import progress_for
from qatsparse.restore import RestoredRun
from qatsparse.restore import restore_run as _restore_run

#: Folder of the shipped recipes (package data; ``recipes/`` at the repository root mirrors it).
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
#: Recipe format versions this release reads (the ``version:`` key of a recipe).
RECIPE_VERSIONS = (1,)


# ---------------------------------------------------------------------------------------- recipes
def recipe_paths() -> dict[str, Path]:
    """Shipped recipes by name.

    Example:
        >>> "digits_int8_sparse" in recipe_paths()
        True
    """
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_description(path: str | Path) -> str:
    """The one-line description of a recipe: its first comment line, without a leading ``name --``."""
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            return re.sub(rf"^{re.escape(Path(path).stem)}\s*(--|:|-)\s*", "", text)
    return ""


def list_recipes() -> dict[str, str]:
    """``{name: one-line description}`` of the shipped recipes (what ``qatsparse recipes`` prints)."""
    return {name: recipe_description(p) for name, p in recipe_paths().items()}


def resolve_config(value: str) -> str:
    """A ``--config`` value as a path: an existing file is kept, a shipped recipe's name (with or
    without ``.yaml``) becomes its path, anything else is an error naming the shipped recipes.

    Example:
        >>> Path(resolve_config("digits_int8_sparse")).name
        'digits_int8_sparse.yaml'
    """
    if Path(value).exists() or value.lstrip().startswith(("{", "[")) or "\n" in value or ":" in value:
        return value  # a file, or inline YAML/JSON (jsonargparse accepts both)
    recipes = recipe_paths()
    name = value[: -len(".yaml")] if value.endswith(".yaml") else value
    if name in recipes:
        return str(recipes[name])
    raise SystemExit(
        f"error: --config {value!r} is neither a file nor a shipped recipe; shipped recipes: {', '.join(recipes)}"
    )


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """Replace every ``--config``/``-c`` value of a command line with :func:`resolve_config`'s path."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            out.append(arg)
            value = next(it, None)
            if value is not None:
                out.append(resolve_config(value))
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


class RecipeVersionError(ArgumentTypeError, ValueError):
    """An unsupported ``version:`` (argparse shows an ArgumentTypeError's message, jsonargparse a ValueError's)."""


def recipe_version(value: Any) -> int:
    """Type of the ``version`` key: an integer among :data:`RECIPE_VERSIONS`."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise RecipeVersionError(f"version must be an integer among {list(RECIPE_VERSIONS)}, got {value!r}") from None
    if v not in RECIPE_VERSIONS:
        raise RecipeVersionError(
            f"recipe version {v} is not supported by this qatsparse; supported versions: {list(RECIPE_VERSIONS)}"
        )
    return v


# ---------------------------------------------------------------------------------------- parser
def _accepted_args(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except Exception:
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _hint(bad: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(bad, valid, n=1)
    maybe = f" (did you mean {close[0]!r}?)" if close else ""
    return f"'{bad}' is not a valid key{maybe}; valid keys: {', '.join(valid)}"


def error_hints(message: str, parser_keys: Sequence[str] = ()) -> list[str]:
    """For each unknown key named in a jsonargparse error: the valid keys there and the closest one.

    Jsonargparse names the unknown key but not the accepted ones; users of recipes need both.

    Example:
        >>> msg = "Problem with given class_path 'qatsparse.TwoFourSparsity':\\n  Option 'start_stp' is not accepted"
        >>> "did you mean 'start_step'?" in error_hints(msg)[0]
        True
    """
    hints = []
    for cls, bad in re.findall(r"class_path '([\w.]+)':\s*\n\s*Option '([\w.]+)' is not accepted", message):
        hints.append(f"{cls}: {_hint(bad, _accepted_args(cls))}")
    unknown = re.findall(r"does not accept option '([\w.]+)'", message)
    unknown += re.findall(r"unrecognized arguments: --([\w.]+)", message)
    if not hints:
        unknown += re.findall(r"^Option '([\w.]+)' is not accepted", message, flags=re.M)
    for key in unknown:
        prefix = key.rpartition(".")[0]
        valid = [k[len(prefix) + 1 :] if prefix else k for k in parser_keys if k.rpartition(".")[0] == prefix]
        if valid:
            hints.append(f"{prefix or 'top level'}: {_hint(key.rpartition('.')[2], sorted(set(valid)))}")
    return hints


class QatsparseArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors about unknown keys also list the valid keys.

    Example:
        >>> p = QatsparseArgumentParser(exit_on_error=False); _ = p.add_argument("--max_steps", type=int)
        >>> try:
        ...     p.parse_args(["--max_stesp=3"])
        ... except Exception as e:
        ...     print("did you mean 'max_steps'?" in str(e))
        True
    """

    def error(self, message: str, ex: Exception | None = None) -> Any:
        parser = getattr(ex, "subcommand_parser", None) or self
        keys = [a.dest for a in getattr(parser, "_actions", [])]
        hints = error_hints(message, keys)
        if hints:
            message = message.rstrip() + "\n" + "\n".join(f"  hint: {h}" for h in hints)
        return super().error(message, ex)


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


def print_recipes() -> None:
    """Print the shipped recipes, one per line with its description."""
    recipes = list_recipes()
    width = max(map(len, recipes), default=0)
    for name, desc in recipes.items():
        print(f"{name:<{width}}  {desc}")
    print(f"\nRun one with `qatsparse fit --config NAME`; the files are in {RECIPES_DIR}")


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
