"""QuantizationAwareTraining: insert TensorRT-style fake quantizers at a step, calibrate, fine-tune."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from qatsparse.callbacks._common import (
    forward_batch,
    load_checkpoint_for_setup,
    notify_before_compression,
    rng_isolated,
    train_batches,
)
from qatsparse.checkpointing import CHECKPOINT_KEY
from qatsparse.quantization import QuantConfig, QuantSummary, calibrate, quantize_model, quantizers


class QuantizationAwareTraining(pl.Callback):
    """INT8 quantization-aware (or FP16-aware) fine-tuning from ``start_step`` on.

    At ``start_step`` every Conv2d/Linear not excluded gets an input and a weight quantizer
    (INT8: per-tensor symmetric activations, per-channel symmetric weights on the output axis, as
    TensorRT's explicit quantization requires); INT8 quantizers are calibrated on ``calib_batches``
    training batches (eval mode, no gradients, training RNG untouched), then training continues with
    fake quantization. Parameters are not replaced, so optimizer state and 2:4 masks survive.

    Args:
        precision: ``"int8"`` or ``"fp16"``.
        calibrator: activation calibrator name.
        calib_batches: number of training batches used for calibration (>= 1).
        start_step: optimizer step at which QAT starts (0 = before the first step).
        percentile: percentile of the ``percentile`` calibrator, in (0, 100].
        exclude: regexes of module names kept in higher precision.
        compile: after calibration, compile the LightningModule (``LightningModule.compile()``, i.e.
            ``torch.compile`` in place) so fake quantization fuses into the surrounding kernels; the
            fast path on GPUs (see docs/BENCHMARKS.md). True uses :data:`qatsparse.compiling.DEFAULT_COMPILE_OPTIONS`,
            a string names a torch.compile mode (e.g. ``"reduce-overhead"``). The export always runs the
            plain module.
        verbose: print the summary of what was quantized.

    Example:
        >>> cb = QuantizationAwareTraining(precision="int8", calib_batches=16, start_step=200)
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=300)  # doctest: +SKIP
    """

    def __init__(
        self,
        precision: Literal["int8", "fp16"] = "int8",
        calibrator: str = "max",
        calib_batches: int = 16,
        start_step: int = 0,
        percentile: float = 99.99,
        exclude: list[str] | None = None,
        compile: bool | str = False,
        verbose: bool = True,
    ) -> None:
        self.config = QuantConfig(
            precision=precision, calibrator=calibrator, percentile=percentile, exclude=list(exclude or [])
        )
        if int(calib_batches) < 1:
            raise ValueError(f"calib_batches must be >= 1, got {calib_batches}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.calib_batches = int(calib_batches)
        self.start_step = int(start_step)
        self.compile = compile
        self.verbose = verbose
        self.applied = False
        self.summary: QuantSummary | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Resuming from a checkpoint taken after QAT started: insert the (uncalibrated) quantizers now,
        # so that Lightning's strict state_dict load restores their calibrated amax exactly.
        ckpt = load_checkpoint_for_setup(trainer)
        if ckpt is None:
            return
        state = (ckpt.get("callbacks") or {}).get(self.state_key) or {}
        if state.get("applied"):  # idempotent when the module already holds quantizers
            self.summary = quantize_model(pl_module, self.config)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied and self.compile:  # resumed after QAT started
            self._compile(pl_module)

    def _compile(self, pl_module: pl.LightningModule) -> None:
        from qatsparse.compiling import compile_module

        compile_module(pl_module, self.compile)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.applied and trainer.global_step >= self.start_step:
            self._apply(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.applied:
            checkpoint.setdefault(CHECKPOINT_KEY, {})["quantization"] = self.config.to_dict()

    # ------------------------------------------------------------------ work
    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        notify_before_compression(trainer, pl_module)
        self.summary = quantize_model(pl_module, self.config)
        if self.config.precision == "int8":
            with rng_isolated(pl_module.device):
                n = calibrate(pl_module, train_batches(trainer, self.calib_batches), partial(forward_batch, pl_module))
            if n < self.calib_batches:
                rank_zero_info(f"calibration used {n} batches: the training dataloader has no more")
        self.applied = True
        if self.compile:
            self._compile(pl_module)
        if self.verbose:
            rank_zero_info(self.describe(pl_module))

    def describe(self, pl_module: pl.LightningModule) -> str:
        """A summary table of what is quantized and with which amax."""
        assert self.summary is not None
        qs = quantizers(pl_module)
        lines = [
            f"QAT ({self.config.precision}, calibrator={self.config.calibrator}): "
            f"{len(self.summary.quantized)} layers quantized"
        ]
        if self.config.precision == "int8":
            for name in self.summary.quantized:
                a = qs.get(f"{name}.input_quantizer")
                w = qs.get(f"{name}.weight_quantizer")
                if a is not None and w is not None:
                    lines.append(
                        f"  {name:<40} input amax {float(a.amax):9.4f}   weight amax "
                        f"{float(w.amax.min()):.4f}..{float(w.amax.max()):.4f}"
                    )
        lines += [f"  kept in higher precision {n}: {why}" for n, why in self.summary.skipped.items()]
        return "\n".join(lines)

    def report(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What goes into report.json's ``quantization`` entry."""
        out: dict[str, Any] = {
            **self.config.to_dict(),
            "applied": self.applied,
            "start_step": self.start_step,
            "calib_batches": self.calib_batches,
        }
        if self.summary is not None:
            qs = quantizers(pl_module)
            out["quantized"] = self.summary.quantized
            out["skipped"] = self.summary.skipped
            if self.config.precision == "int8":
                out["input_amax"] = {
                    n: float(qs[f"{n}.input_quantizer"].amax)
                    for n in self.summary.quantized
                    if f"{n}.input_quantizer" in qs
                }
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "config": self.config.to_dict(), "start_step": self.start_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict.get("applied", False))
