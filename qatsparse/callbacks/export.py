"""TensorRTExport: at fit end save the model, export ONNX, build an engine where TensorRT exists, validate, report."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from qatsparse.callbacks._common import before_wrapping, find_callback
from qatsparse.checkpointing import snapshot_state_dict, with_metadata
from qatsparse.export_preflight import check_onnx_size
from qatsparse.gate import GateFailed, enforce_gate
from qatsparse.lightning_compat import Callback
from qatsparse.loaders import find_val_dataloader
from qatsparse.log_metrics import log_to_loggers, report_metrics
from qatsparse.pipeline import ExportSettings, export_and_validate
from qatsparse.preflight import (
    Checks,
    FitData,
    check_batch_sizes,
    check_dirpath,
    check_engine_available,
    check_max_metric_drop,
    check_module_names,
    check_opset,
    check_positive,
    check_validation,
    run_preflight,
)
from qatsparse.progress import QUIET, Progress, progress_for
from qatsparse.recovery import export_failed, gate_failed, save_checkpoint
from qatsparse.sharding import check_full_state_dict, full_weights


class TensorRTExport(Callback):
    """Save, export, build and validate at the end of ``fit``; write ``report.{json,md,png}`` in ``dirpath``.

    First saves the trained model as ``model.ckpt`` (a Lightning checkpoint with the 2:4 masks, the
    quantizers and the dense reference), then writes ``model_fp32.onnx`` (the trained model without fake
    quantization), ``model.onnx`` (the deployable graph: Q/DQ INT8 after INT8 QAT, FP16 after FP16 QAT,
    else FP32), the TensorRT hand-off bundle ``tensorrt/`` (trtexec ``build.sh``, Polygraphy ``check.sh``, a
    validation batch and the outputs for it), ``model.plan`` where TensorRT is importable, and the report
    comparing every backend with ``pytorch_fp32`` -- the dense FP32 model as it was just before the first
    pruning or quantization step. The report's numbers also go to the Trainer's loggers under
    ``qatsparse/report/``; the export and the validation show progress in the style of the Trainer's
    progress bar. If a step after the checkpoint fails, ``report.json`` records what completed and the
    error, and the raised :class:`~qatsparse.recovery.ExportFailed` gives the command that finishes the
    export from ``model.ckpt``. Everything that can be checked before training is checked at
    ``on_fit_start``: the folder, the validation data, the model on a validation batch, names, metrics and
    gate (:mod:`qatsparse.preflight`).

    Args:
        dirpath: output folder.
        max_metric_drop: largest allowed drop of each metric vs the reference (absolute), one number
            or a {metric: bound} mapping.
        on_fail: ``"raise"`` (fail the run after writing the report) or ``"warn"``.
        build_engine: ``"auto"`` (build where TensorRT imports), True (required), False (never).
        batch_sizes: TensorRT optimization profile (min, opt, max).
        workspace_gb: TensorRT builder workspace.
        input_names / output_names: ONNX tensor names (defaults: the keys of a dict
            ``example_input_array`` / dict output, else ``input``/``output``, numbered when there are several).
        opset: ONNX opset (>= 17; INT8 graphs with an FP16 remainder use >= 19).
        metrics: validation metrics -- a torchmetrics class, instance or import path
            (``"torchmetrics.MeanSquaredError"``), ``{"class_path": ..., "init_args": ...}``, a list of them,
            or ``{output_name: metric}`` for multi-output models. Default: top-1 accuracy for logits,
            MSE for float targets.
        keep_fp32: module names kept in FP32 in FP16 graphs (added to the QAT report's ``keep_fp32``).
        fp16_remainder: INT8 graphs run everything not quantized in FP16 (cast in the graph).
        lint: lint ``model.onnx`` before any build; findings go to the report.
        dynamic_axes: input axes besides the batch that may vary: ``"auto"`` (default: axis 1 of every
            integer input, e.g. token ids, is ``"sequence"``), None (batch only), or
            ``{input name: {axis: dim name}}`` (e.g. ``{"input": {2: "height", 3: "width"}}``). The ONNX
            files carry them as symbolic dims; after the export ONNX Runtime runs each at another size
            (a declared axis the graph does not accept is an error).
        dim_ranges: TensorRT ``(min, opt, max)`` per dynamic dim name besides the batch, e.g.
            ``{"sequence": (1, 128, 512)}`` (without one, the profile fixes that dim at the example's size
            and the report says so; the batch uses ``batch_sizes``).
        ort_graph_optimization: ONNX Runtime graph-optimization level of the validation: ``"auto"`` (ONNX
            Runtime's default unless, on the first validation batch, it changes the graph's outputs -- as its
            fused integer kernels do on some Q/DQ graphs -- then none), or ``"all"``, ``"extended"``,
            ``"basic"``, ``"disabled"``. The level used and why are in ``report["onnxruntime"]``.

    Example:
        >>> cb = TensorRTExport(dirpath="export/", max_metric_drop=0.01,
        ...                     metrics={"value": "torchmetrics.MeanSquaredError"})
        >>> trainer = pl.Trainer(callbacks=[cb])  # doctest: +SKIP
    """

    def __init__(
        self,
        dirpath: str | Path = "export",
        max_metric_drop: float | Mapping[str, float] = 0.01,
        on_fail: Literal["raise", "warn"] = "raise",
        build_engine: bool | Literal["auto"] = "auto",
        batch_sizes: Sequence[int] = (1, 32, 256),
        workspace_gb: float = 4.0,
        input_names: list[str] | None = None,
        output_names: list[str] | None = None,
        opset: int = 17,
        metrics: Any = None,
        keep_fp32: list[str] | None = None,
        fp16_remainder: bool = True,
        lint: bool = True,
        dynamic_axes: Mapping[str, Mapping[int, str]] | Literal["auto"] | None = "auto",
        dim_ranges: Mapping[str, Sequence[int]] | None = None,
        ort_graph_optimization: Literal["auto", "all", "extended", "basic", "disabled"] = "auto",
    ) -> None:
        if on_fail not in ("raise", "warn"):
            raise ValueError(f"TensorRTExport(on_fail={on_fail!r}): on_fail must be 'raise' or 'warn'")
        if not (build_engine == "auto" or isinstance(build_engine, bool)):
            raise ValueError(
                f"TensorRTExport(build_engine={build_engine!r}): build_engine must be 'auto', True or False"
            )
        check_opset(opset)
        check_max_metric_drop(max_metric_drop)
        from qatsparse.export.ort_level import check_level

        check_level(ort_graph_optimization)
        from qatsparse.export.shapes import check_axes_spec, check_dim_ranges

        if dynamic_axes is not None and dynamic_axes != "auto":
            dynamic_axes = check_axes_spec(dynamic_axes)
        self.settings = ExportSettings(
            dirpath=Path(dirpath),
            max_metric_drop=max_metric_drop,
            build_engine=build_engine,
            batch_sizes=check_batch_sizes(batch_sizes),
            workspace_gb=check_positive("TensorRTExport", "workspace_gb", workspace_gb),
            input_names=input_names,
            output_names=output_names,
            opset=opset,
            metrics=metrics,
            keep_fp32=list(keep_fp32 or []),
            fp16_remainder=fp16_remainder,
            lint=lint,
            dynamic_axes=dynamic_axes,
            dim_ranges=check_dim_ranges(dim_ranges),
            ort_graph_optimization=ort_graph_optimization,
        )
        if metrics is not None:  # bad metric configurations fail here, before training
            from qatsparse.metrics import metric_specs

            named: list[str] = []
            if isinstance(metrics, Mapping) and "class_path" not in metrics:
                named = [str(k) for k in metrics]
            elif isinstance(metrics, (list, tuple)):
                named = [str(m["output"]) for m in metrics if isinstance(m, Mapping) and "output" in m]
            try:
                metric_specs(metrics, output_names or list(dict.fromkeys(named)) or ["output"])
            except ValueError as e:
                raise ValueError(f"TensorRTExport(metrics={metrics!r}): {e}") from None
        self.on_fail = on_fail
        self.reference_state: dict[str, torch.Tensor] | None = None
        self.report: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        before_wrapping(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_preflight(trainer, pl_module, caller=self)

    def on_before_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Snapshot the dense FP32 reference (called by the compression callbacks, once)."""
        if self.reference_state is None:
            self.reference_state = snapshot_state_dict(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoint = save_checkpoint(trainer, self.settings.dirpath)  # the trained model is safe from here on
        pl_module.zero_grad(set_to_none=True)  # the last step's gradients: a copy of the weights fewer in the export
        # Under FSDP rank 0 gathers the full model (on the CPU) and exports it; the other ranks wait and write nothing.
        with full_weights(trainer, rank0_only=True):
            if trainer.is_global_zero:
                self.report = self._export_or_explain(trainer, pl_module, checkpoint)
                # LightningModule.log is not allowed in on_fit_end: the loggers' own API (logged before the gate raises)
                log_to_loggers(trainer, report_metrics(self.report))
        trainer.strategy.barrier()
        if self.report is not None:
            try:
                enforce_gate(self.report, self.on_fail)
            except GateFailed as e:
                raise gate_failed(e, trainer, checkpoint) from None

    # ------------------------------------------------------------------ checks
    def preflight(self, check: Checks, trainer: pl.Trainer, pl_module: pl.LightningModule, data: FitData) -> None:
        """Before step 0 (see :mod:`qatsparse.preflight`): what the export, validation and gate will need."""
        check(check_engine_available, self.settings.build_engine)
        check(check_full_state_dict, trainer, "TensorRTExport")
        check(check_onnx_size, pl_module)
        for warning in check(check_validation, data, self.settings, self.on_fail) or []:
            rank_zero_warn(warning)
        check(
            check_module_names,
            pl_module,
            self.settings.keep_fp32,
            f"TensorRTExport(keep_fp32={self.settings.keep_fp32!r})",
        )
        check(check_dirpath, self.settings.dirpath)

    # ------------------------------------------------------------------ work
    def reference_model(self, pl_module: pl.LightningModule) -> pl.LightningModule | None:
        """The dense FP32 model as it was before the first compression step (None if never compressed)."""
        if self.reference_state is None:
            return None
        from qatsparse.quantization import remove_quantizers

        ref = remove_quantizers(copy.deepcopy(pl_module).cpu())
        ref.load_state_dict(with_metadata(self.reference_state, ref))
        return ref

    def _export_or_explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Path) -> dict:
        completed = ["checkpoint"]
        try:
            return self.export(trainer, pl_module, completed)
        except Exception as e:
            raise export_failed(e, trainer, checkpoint, self.settings.dirpath, completed) from e

    def export(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, completed: list[str] | None = None
    ) -> dict[str, Any]:
        """Export, build, validate and write the report for the model at fit end (``completed``: see
        :func:`~qatsparse.pipeline.export_and_validate`)."""
        from qatsparse.callbacks.quantization import QuantizationAwareTraining
        from qatsparse.callbacks.sparsity import TwoFourSparsity

        sparsity_cb = find_callback(trainer, TwoFourSparsity)
        qat_cb = find_callback(trainer, QuantizationAwareTraining)
        report = export_and_validate(
            pl_module,
            self.reference_model(pl_module),
            self._val_dataloader(trainer),
            self.settings,
            pruned_layers=sparsity_cb.pruned_layers if sparsity_cb else [],
            skipped_layers=sparsity_cb.masks.skipped if sparsity_cb and sparsity_cb.masks else {},
            quantization=qat_cb.report(pl_module) if qat_cb else {},
            progress=progress_for(trainer),
            validate_command=self.validate_command(trainer),
            completed=completed,
            sparsity=sparsity_cb.kept_magnitude() if sparsity_cb else {},
        )
        rank_zero_info(f"qatsparse: artifacts and report in {self.settings.dirpath}")
        return report

    def export_checkpoint(
        self,
        model: Any,
        ckpt_path: str | Path,
        val_dataloader: Any,
        weights_only: bool = False,
        progress: Progress = QUIET,
    ) -> dict[str, Any]:
        """Export, build, validate and report from a checkpoint -- e.g. ``dirpath/model.ckpt`` after an export
        that failed -- with this callback's settings; the gate is enforced as at fit end.

        Args:
            model: the LightningModule (an instance, or its class: built from the checkpoint's hyperparameters).
            ckpt_path: the checkpoint (masks, quantizers and the dense reference are read from it).
            val_dataloader: the validation data.
            weights_only: ``torch.load(weights_only=...)`` of the checkpoint.
            progress: shows the export, the engine build and the validation (default: quiet).

        Example:
            >>> cb = TensorRTExport(dirpath="runs/x")
            >>> cb.export_checkpoint(MyModel, "runs/x/model.ckpt", val_dl)  # doctest: +SKIP
        """
        from qatsparse.callbacks.quantization import QuantizationAwareTraining
        from qatsparse.callbacks.sparsity import TwoFourSparsity
        from qatsparse.checkpointing import load_from_checkpoint
        from qatsparse.restore import restore_run

        if isinstance(model, type):
            model = load_from_checkpoint(model, ckpt_path, map_location="cpu")
        run = restore_run(
            model, ckpt_path, self, TwoFourSparsity(), QuantizationAwareTraining(), weights_only=weights_only
        )
        report = export_and_validate(
            run.model,
            run.reference,
            val_dataloader,
            self.settings,
            pruned_layers=run.pruned_layers,
            skipped_layers=run.skipped_layers,
            quantization=run.quantization,
            progress=progress,
        )
        rank_zero_info(f"qatsparse: artifacts and report in {self.settings.dirpath}")
        self.report = report
        enforce_gate(report, self.on_fail)
        return report

    def validate_command(self, trainer: pl.Trainer) -> str:
        """The ``qatsparse validate ... --engine`` command that re-validates the hand-off engine of this run:
        the config LightningCLI saved and the run's checkpoint, where they are known."""
        import os

        d = Path(self.settings.dirpath)
        config = next(
            (os.path.join(trainer.log_dir or ".", cb.config_filename) for cb in trainer.callbacks  # type: ignore[attr-defined]
             if type(cb).__name__ == "SaveConfigCallback" and hasattr(cb, "config_filename")),
            "<the run's config>",
        )  # fmt: skip
        ckpt_cb = trainer.checkpoint_callback
        candidates = [d / "model.ckpt", *(Path(p) for p in (getattr(ckpt_cb, "last_model_path", ""),
                                                         getattr(ckpt_cb, "best_model_path", "")) if p)]  # fmt: skip
        ckpt = next((str(p) for p in candidates if p.is_file()), "<the run's checkpoint>")
        return f"qatsparse validate --config {config} --ckpt_path {ckpt} --engine {d / 'tensorrt' / 'model.plan'}"

    @staticmethod
    def _val_dataloader(trainer: pl.Trainer) -> Any:
        loader = find_val_dataloader(trainer)
        if loader is None:  # checked before training; a Trainer reused without on_fit_start gets here
            raise RuntimeError("TensorRTExport needs validation data: give trainer.fit(...) a val dataloader")
        return loader

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"reference_state": self.reference_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference_state = state_dict.get("reference_state")
