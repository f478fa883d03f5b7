"""TensorRTExport: at fit end export ONNX, build an engine where TensorRT exists, validate, report."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from qatsparse.callbacks._common import find_callback
from qatsparse.pipeline import ExportSettings, export_and_validate


class TensorRTExport(pl.Callback):
    """Export, build and validate at the end of ``fit``; write ``report.{json,md,png}`` in ``dirpath``.

    Writes ``model_fp32.onnx`` (the trained model without fake quantization), ``model.onnx`` (the
    deployable graph: Q/DQ INT8 after INT8 QAT, FP16 after FP16 QAT, else FP32), ``model.plan`` where
    TensorRT is importable, and the report comparing every backend with ``pytorch_fp32`` -- the dense
    FP32 model as it was just before the first pruning or quantization step.

    Args:
        dirpath: output folder.
        max_metric_drop: largest allowed drop of each metric vs the reference (absolute), one number
            or a {metric: bound} mapping.
        on_fail: ``"raise"`` (fail the run after writing the report) or ``"warn"``.
        build_engine: ``"auto"`` (build where TensorRT imports), True (required), False (never).
        batch_sizes: TensorRT optimization profile (min, opt, max).
        workspace_gb: TensorRT builder workspace.
        input_names / output_names: ONNX tensor names (defaults ``input``/``output``, numbered when
            there are several).
        opset: ONNX opset (>= 17).

    Example:
        >>> cb = TensorRTExport(dirpath="export/", max_metric_drop=0.01)
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
    ) -> None:
        if on_fail not in ("raise", "warn"):
            raise ValueError(f"on_fail must be 'raise' or 'warn', got {on_fail!r}")
        if build_engine not in ("auto", True, False):
            raise ValueError(f"build_engine must be 'auto', True or False, got {build_engine!r}")
        self.settings = ExportSettings(
            dirpath=Path(dirpath),
            max_metric_drop=max_metric_drop,
            build_engine=build_engine,
            batch_sizes=tuple(batch_sizes),
            workspace_gb=workspace_gb,
            input_names=input_names,
            output_names=output_names,
            opset=opset,
        )
        self.on_fail = on_fail
        self.reference_state: dict[str, torch.Tensor] | None = None
        self.report: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.settings.build_engine is True:
            from qatsparse.export.tensorrt import tensorrt_available

            if not tensorrt_available():
                raise RuntimeError(
                    "TensorRTExport(build_engine=True) but `import tensorrt` fails or there is "
                    "no CUDA device; use build_engine='auto' to skip the engine where it can't run"
                )

    def on_before_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Snapshot the dense FP32 reference (called by the compression callbacks, once)."""
        if self.reference_state is None:
            self.reference_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        failures: list[str] = []
        if trainer.is_global_zero:
            self.report = self.export(trainer, pl_module)
            failures = self.report["gate"]["failures"]
        trainer.strategy.barrier()
        if failures:
            msg = "qatsparse accuracy gate failed:\n  " + "\n  ".join(failures)
            if self.on_fail == "raise":
                raise RuntimeError(msg + f"\n(report in {self.settings.dirpath})")
            rank_zero_warn(msg)

    # ------------------------------------------------------------------ work
    def reference_model(self, pl_module: pl.LightningModule) -> pl.LightningModule | None:
        """The dense FP32 model as it was before the first compression step (None if never compressed)."""
        if self.reference_state is None:
            return None
        from qatsparse.quantization import remove_quantizers

        ref = remove_quantizers(copy.deepcopy(pl_module).cpu())
        ref.load_state_dict(self.reference_state)
        return ref

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
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
        )
        rank_zero_info(f"qatsparse: artifacts and report in {self.settings.dirpath}")
        return report

    @staticmethod
    def _val_dataloader(trainer: pl.Trainer) -> Any:
        dm = trainer.datamodule  # type: ignore[attr-defined]
        if dm is not None and type(dm).val_dataloader is not pl.LightningDataModule.val_dataloader:
            return dm.val_dataloader()  # fresh, unsharded: rank 0 validates the whole set
        loaders = trainer.val_dataloaders
        if loaders is None:
            raise RuntimeError("TensorRTExport needs validation data: give the Trainer a val dataloader")
        return loaders[0] if isinstance(loaders, (list, tuple)) else loaders

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"reference_state": self.reference_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference_state = state_dict.get("reference_state")
