"""QuantizationAwareTraining: insert TensorRT-style fake quantizers at a step, calibrate, fine-tune."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from qatsparse.attention import fast_paths_off
from qatsparse.callbacks._common import (
    HealthWatch,
    before_wrapping,
    forward_batch,
    load_checkpoint_for_setup,
    notify_before_compression,
    rng_isolated,
    train_batches,
)
from qatsparse.checkpointing import CHECKPOINT_KEY, add_load_hint, drop_load_hint
from qatsparse.lightning_compat import Callback
from qatsparse.log_metrics import log_to_loggers, quantization_hparams, quantization_metrics
from qatsparse.patterns import compile_patterns
from qatsparse.preflight import (
    Checks,
    FitData,
    check_forward,
    check_int,
    check_quantizable_patterns,
    check_start_step,
    run_preflight,
)
from qatsparse.progress import progress_for
from qatsparse.quantization import (
    LayerSensitivity,
    QuantConfig,
    QuantSummary,
    calibrate,
    format_sensitivity,
    is_quantized,
    quantize_model,
    requantize,
    sensitivity,
    track_overflow,
)
from qatsparse.quantization.fp16 import run_fp16_range_check
from qatsparse.quantization.higher_precision import keep_most_sensitive, keep_overflowing, keep_unreached
from qatsparse.quantization.reporting import describe_quantization, kept_fp32, summary_entries
from qatsparse.quantization.resume import restore_quantizers
from qatsparse.quantization.sensitivity import METRICS, Metric
from qatsparse.sharding import FSDP_PREFIX, check_full_state_dict, clean_name, full_weights, module_names


class QuantizationAwareTraining(Callback):
    """INT8 quantization-aware (or FP16-aware) fine-tuning from ``start_step`` on.

    At ``start_step`` every quantizable layer not excluded (Conv1d/Conv2d/ConvTranspose2d/Linear, transformers
    ``Conv1D``, ``nn.MultiheadAttention``; see :mod:`qatsparse.quantization.layers`) gets an input and a
    weight quantizer (INT8: per-tensor symmetric activations, per-channel symmetric weights on the output axis, as
    TensorRT's explicit quantization requires) and, for INT8, the residual input of every ``a + b``
    after a quantized conv gets one too (so TensorRT fuses the add). INT8 quantizers are calibrated on
    ``calib_batches`` training batches (eval mode, no gradients, training RNG untouched), then
    training continues with fake quantization. Parameters are not replaced, so optimizer state and
    2:4 masks survive.

    With ``precision="fp16"`` the forward rounds weights and activations to half precision; layers
    whose activations (or weights) leave the FP16 range or turn inf/NaN -- found on the calibration
    batches and checked again at every training epoch end -- are reported by name and kept in FP32
    from then on (``report()["keep_fp32"]``, which the FP16 export keeps in FP32).

    Args:
        precision: ``"int8"`` or ``"fp16"``.
        calibrator: activation calibrator, one of ``"max"``, ``"entropy"``, ``"percentile"``, ``"mse"``.
        calib_batches: number of training batches used for calibration (>= 1).
        start_step: optimizer step at which QAT starts (0 = before the first step). A step the Trainer never
            reaches is an error before the first step.
        percentile: percentile of the ``percentile`` calibrator, in (0, 100].
        exclude: patterns of module names kept in higher precision: regexes searched in the name, or globs
            such as ``"*head*"`` (:mod:`qatsparse.patterns`); one matching no Conv2d/Linear is an error.
        compile: after calibration, compile the LightningModule (``LightningModule.compile()``, i.e.
            ``torch.compile`` in place) so fake quantization fuses into the surrounding kernels; the
            fast path on GPUs (see docs/BENCHMARKS.md). True uses :data:`qatsparse.compiling.DEFAULT_COMPILE_OPTIONS`,
            a string names a torch.compile mode (e.g. ``"reduce-overhead"``). The export always runs the
            plain module.
        attention_matmuls: INT8: also quantize the two matmuls inside ``nn.MultiheadAttention`` (Q·Kᵀ and
            softmax·V); their projections are quantized either way (default and measurement in
            docs/quantization.md).
        recompute: with ``compile``, let the backward recompute fake-quantized conv/linear inputs instead
            of keeping them: about AMP's memory for some more backward work, the same numbers
            (``QuantConfig.recompute``; both settings measured in docs/BENCHMARKS.md). ``False`` keeps
            them: faster on some models (ResNet-50), at more memory.
        auto_exclude: keep the ``k`` layers most sensitive to quantization in higher precision
            (ranked by :func:`~qatsparse.quantization.sensitivity` on the calibration batches).
        sensitivity_metric: metric of that ranking: ``"mse"`` (to the FP32 outputs), ``"top1"``,
            ``"agreement"`` or a function (see :func:`~qatsparse.quantization.sensitivity`).
        verbose: print the summary of what was quantized.

    Example:
        >>> cb = QuantizationAwareTraining(precision="int8", calibrator="entropy", calib_batches=16, start_step=200)
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=300)  # doctest: +SKIP
    """

    def __init__(
        self,
        precision: Literal["int8", "fp16"] = "int8",
        calibrator: str = "max",
        calib_batches: int = 16,
        start_step: int = 0,
        percentile: float = 99.99,
        exclude: list[str] | str | None = None,
        compile: bool | str = False,
        recompute: bool = True,
        auto_exclude: int = 0,
        sensitivity_metric: str | Metric = "mse",
        attention_matmuls: bool = False,
        verbose: bool = True,
    ) -> None:
        if not isinstance(attention_matmuls, bool):
            raise ValueError(f"attention_matmuls must be True or False, got {attention_matmuls!r}")
        if not isinstance(recompute, bool):
            raise ValueError(f"recompute must be True or False, got {recompute!r}")
        excluded = [exclude] if isinstance(exclude, str) else list(exclude or [])
        compile_patterns(excluded, f"QuantizationAwareTraining(exclude={excluded!r})")
        try:
            self.config = QuantConfig(
                precision=precision,
                calibrator=calibrator,
                percentile=percentile,
                exclude=excluded,
                attention_matmuls=attention_matmuls,
                recompute=recompute,
            )
        except ValueError as e:
            raise ValueError(f"QuantizationAwareTraining: {e}") from None
        if isinstance(calib_batches, bool) or int(calib_batches) != calib_batches or calib_batches < 1:
            raise ValueError(
                f"QuantizationAwareTraining(calib_batches={calib_batches!r}): calib_batches must be an integer >= 1, "
                f"got {calib_batches!r}"
            )
        check_int("QuantizationAwareTraining", "start_step", start_step, 0)
        if int(auto_exclude) != auto_exclude or auto_exclude < 0:
            raise ValueError(f"auto_exclude must be an integer >= 0, got {auto_exclude!r}")
        if isinstance(sensitivity_metric, str) and sensitivity_metric not in METRICS:
            raise ValueError(
                f"sensitivity_metric must be one of {sorted(METRICS)} or a callable, got {sensitivity_metric!r}"
            )
        self.calib_batches = int(calib_batches)
        self.start_step = int(start_step)
        if compile is not False:
            from qatsparse.compiling import compile_kwargs

            try:
                compile_kwargs(compile)
            except ValueError as e:
                raise ValueError(f"QuantizationAwareTraining: {e}") from None
        self.compile = compile
        self.auto_exclude = int(auto_exclude)
        self.sensitivity_metric: str | Callable = sensitivity_metric
        self.verbose = verbose
        self.applied = False
        self.summary: QuantSummary | None = None
        self.sensitivity: list[LayerSensitivity] = []
        self.fp16_overflow: dict[str, float] = {}
        # PyTorch's attention fast paths bypass the quantized modules in eval mode (Lightning's validation
        # loop too): off from QAT start to the end of the run, the user's setting restored at teardown.
        self._fast_paths: contextlib.ExitStack | None = None
        self._pending_amax: dict[str, torch.Tensor] | None = None  # FSDP resume: see _before_state_dict_load
        self.health = HealthWatch()  # a loss or gradient blowing up after QAT starts is reported at once

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Resuming from a checkpoint taken after QAT started: the quantizers must exist, exactly as they
        # were (config incl. the layers kept in higher precision), before Lightning's strict
        # state_dict load restores their calibrated amax; calibration is then not repeated.
        # `trainer.ckpt_path` is known here only when the user set it; with `fit(ckpt_path=...)` it is
        # known once the checkpoint is read, which is before the state_dict load: a load_state_dict
        # pre-hook on the module inserts the quantizers then.
        before_wrapping(trainer, pl_module)
        self._restore_from(load_checkpoint_for_setup(trainer), pl_module)
        self._load_hook = pl_module.register_load_state_dict_pre_hook(partial(self._before_state_dict_load, trainer))

    def _before_state_dict_load(self, trainer: pl.Trainer, module: Any, state_dict: dict, prefix: str, *_: Any) -> None:
        # The module itself is loaded (prefix ""), or as the one module inside FSDP's root wrapper.
        if prefix not in ("", FSDP_PREFIX):
            return
        drop_load_hint(state_dict, prefix)
        if is_quantized(module) or not any(k.endswith("_quantizer.amax") for k in state_dict):
            return
        if prefix == FSDP_PREFIX:
            # FSDP: inner units' weights are still shards here, so the quantizers cannot be sized yet. Their amax
            # leaves the state_dict now (nothing else expects it) and they are rebuilt at on_train_start.
            self._pending_amax = {
                # torch.clone also reads a tensor Lightning's lazy checkpoint loader has not read yet
                clean_name(k.removeprefix(prefix)).removesuffix(".amax"): torch.clone(state_dict.pop(k))
                for k in [k for k in state_dict if k.endswith("_quantizer.amax")]
            }
            return
        self._restore_from(load_checkpoint_for_setup(trainer), module)

    def _restore_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under FSDP, after a resume: rebuild the quantizers of the recorded config on the full weights and load
        the amax values the checkpoint held (every rank)."""
        pending, self._pending_amax = self._pending_amax, None
        with full_weights(trainer):
            self.summary = restore_quantizers(pl_module, self.config, pending)

    def _restore_from(self, ckpt: dict[str, Any] | None, pl_module: pl.LightningModule) -> None:
        if ckpt is None:
            return
        state = (ckpt.get("callbacks") or {}).get(self.state_key) or {}
        if state.get("applied"):  # idempotent when the module already holds quantizers
            self.config = QuantConfig(**state["config"])
            self.summary = restore_quantizers(pl_module, self.config)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_preflight(trainer, pl_module, caller=self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()  # checkpoints are restored by now; don't let deepcopies carry the hook
        if self._pending_amax is not None:
            self._restore_pending(trainer, pl_module)
        if self.applied:
            self._hold_fast_paths_off()
        if self.applied and self.compile:  # resumed after QAT started
            self._compile(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_quantized(pl_module):  # trainer.validate/test/predict of a QAT model: run the real modules
            self._hold_fast_paths_off()

    on_test_start = on_predict_start = on_validation_start

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_load_hook()
        if self._fast_paths is not None:
            self._fast_paths.close()
            self._fast_paths = None

    def _hold_fast_paths_off(self) -> None:
        if self._fast_paths is None:
            self._fast_paths = contextlib.ExitStack()
            self._fast_paths.enter_context(fast_paths_off())

    def _remove_load_hook(self) -> None:
        hook = getattr(self, "_load_hook", None)
        if hook is not None:
            hook.remove()
            self._load_hook = None

    def _compile(self, pl_module: pl.LightningModule) -> None:
        from qatsparse.compiling import compile_module

        compile_module(pl_module, self.compile, recompute=self.config.recompute)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.applied and trainer.global_step >= self.start_step:
            self._apply(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.health.before_optimizer_step(trainer, pl_module, self.start_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.health.after_batch(trainer, pl_module, outputs, self.start_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.health.drain()  # the last step's checks, before anything reports

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied and self.config.precision == "fp16":
            self._check_fp16(trainer, pl_module, "training")
        if self.applied:  # identical on every rank; sync_dist only keeps Lightning's DDP warning quiet
            with module_names(trainer):  # FSDP: the names the quantizers were inserted under
                metrics = quantization_metrics(self.report(pl_module))
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.applied:
            checkpoint.setdefault(CHECKPOINT_KEY, {})["quantization"] = self.config.to_dict()
            add_load_hint(checkpoint, type(pl_module).__name__)  # a plain strict load then names the fix

    # ------------------------------------------------------------------ checks
    def preflight(self, check: Checks, trainer: pl.Trainer, pl_module: pl.LightningModule, data: FitData) -> None:
        """Before step 0 (see :mod:`qatsparse.preflight`): QAT's step is reached, ``exclude`` matches layers,
        and the model takes a training batch as calibration will feed it."""
        check(check_start_step, trainer, "QuantizationAwareTraining", self.start_step, done=self.applied)
        check(check_full_state_dict, trainer, "QuantizationAwareTraining")
        if not self.applied:
            check(check_quantizable_patterns, pl_module, self.config.exclude)
            check(self._calibration_batch, pl_module, data)

    def _calibration_batch(self, pl_module: pl.LightningModule, data: FitData) -> None:
        where = "QuantizationAwareTraining (calibration runs the model on training batches)"
        try:
            batch = data.train_batch()
        except ValueError as e:
            raise ValueError(f"{where}: the training dataloader: {e}") from None
        check_forward(pl_module, batch, where)

    # ------------------------------------------------------------------ work
    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Under FSDP every rank works on the full weights: quantizers sized by the full weights, calibration
        # forwards and per-channel weight amax on them, statistics reduced over the ranks as under DDP.
        with full_weights(trainer):
            self._quantize_and_calibrate(trainer, pl_module)
        self.applied = True
        self.health.started(trainer, "INT8 QAT started" if self.config.precision == "int8" else "FP16 QAT started")
        log_to_loggers(trainer, {}, quantization_hparams(self.config.to_dict()))
        if self.compile:
            self._compile(pl_module)
        if self.verbose:
            with module_names(trainer):
                rank_zero_info(self.describe(pl_module))

    def _quantize_and_calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        notify_before_compression(trainer, pl_module)
        self._hold_fast_paths_off()
        self.summary = quantize_model(pl_module, self.config)
        batches = partial(train_batches, trainer, self.calib_batches)
        passes = 1 if self.config.precision == "fp16" or self.config.calibrator == "max" else 2
        what = f"calibrating INT8 ({self.config.calibrator})" if self.config.precision == "int8" else "FP16 range check"
        task = progress_for(trainer).task(what, total=self.calib_batches * passes)

        def forward(batch: Any) -> Any:
            out = forward_batch(pl_module, batch)
            task.advance()
            return out

        with rng_isolated(pl_module.device), task:
            if self.config.precision == "int8":
                n = calibrate(pl_module, batches, forward, unreached="keep")
                if n < self.calib_batches:
                    rank_zero_info(f"calibration used {n} batches: the training dataloader has no more")
                self._keep_unreached(pl_module)
            else:
                run_fp16_range_check(pl_module, batches, forward)  # the calibration batches look for FP16 overflow
            if self.config.precision == "fp16":  # before any requantize drops the overflow statistics
                self._check_fp16(trainer, pl_module, "calibration batches")
            if self.auto_exclude:
                self._auto_exclude(trainer, pl_module, list(batches()))
                if self.config.precision == "fp16":
                    track_overflow(pl_module)  # requantize made fresh quantizers: keep watching them

    def _keep_unreached(self, pl_module: pl.LightningModule) -> None:
        """Layers whose forward the calibration batches never ran stay in higher precision, named."""
        missing = keep_unreached(pl_module, self.config)
        if not missing:
            return
        rank_zero_warn(
            f"qatsparse: calibration never ran {sorted(missing)}; they are kept in higher precision "
            "(see the quantization summary)"
        )
        self.summary = requantize(pl_module, self.config)

    def _auto_exclude(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> None:
        rows = sensitivity(pl_module, batches, self.sensitivity_metric, forward=lambda m, b: forward_batch(m, b))
        rows = trainer.strategy.broadcast(rows, src=0)  # every rank keeps the same layers
        self.sensitivity = rows
        keep = keep_most_sensitive(rows, self.auto_exclude, self.config)
        self.summary = requantize(pl_module, self.config)
        rank_zero_info(format_sensitivity(rows, kept=keep))

    def _check_fp16(self, trainer: pl.Trainer, pl_module: pl.LightningModule, where: str) -> None:
        with full_weights(trainer):  # FSDP: weights' peaks and requantize on the full weights (re-entrant)
            self._check_fp16_full(pl_module, where)

    def _check_fp16_full(self, pl_module: pl.LightningModule, where: str) -> None:
        flagged = keep_overflowing(pl_module, self.config, where)
        if not flagged:
            return
        self.fp16_overflow.update(flagged)
        rank_zero_warn(
            "qatsparse: layers outside the FP16 range (kept in FP32 from now on): "
            + ", ".join(f"{n} (peak {p:.4g})" for n, p in flagged.items())
        )
        self.summary = requantize(pl_module, self.config)
        track_overflow(pl_module)

    # ------------------------------------------------------------------ reporting
    def keep_fp32(self) -> list[str]:
        """Layers kept in higher precision on purpose: excluded by the user, auto-excluded, FP16 overflow."""
        return kept_fp32(self.config, self.summary)

    def describe(self, pl_module: pl.LightningModule) -> str:
        """A summary table of what is quantized and with which amax."""
        assert self.summary is not None
        return describe_quantization(pl_module, self.config, self.summary)

    def report(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What goes into report.json's ``quantization`` entry.

        Keys: the config, ``applied``, ``start_step``, ``calib_batches``, ``quantized``, ``skipped``,
        ``residual_quantizers``, ``notes``, ``input_amax``/``residual_amax`` (INT8), ``keep_fp32``
        (module names to keep in FP32 in the FP16/INT8 ONNX), ``fp16_overflow``, ``sensitivity`` and ``health``
        (non-finite or exploding loss/gradients after QAT started, with the step and the layers named).
        """
        self.health.drain()
        out: dict[str, Any] = {
            **self.config.to_dict(),
            "applied": self.applied,
            "start_step": self.start_step,
            "calib_batches": self.calib_batches,
            "auto_exclude": self.auto_exclude,
            "keep_fp32": self.keep_fp32(),
            "fp16_overflow": dict(self.fp16_overflow),
            "sensitivity": [r.to_dict() for r in self.sensitivity],
            "health": [e.to_dict() for e in self.health.monitor.events],
        }
        if self.summary is not None:
            out.update(summary_entries(pl_module, self.config, self.summary))
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self.health.drain()  # a checkpoint holds every event up to its step
        return {
            "applied": self.applied,
            "config": self.config.to_dict(),
            "start_step": self.start_step,
            "sensitivity": [r.to_dict() for r in self.sensitivity],
            "fp16_overflow": dict(self.fp16_overflow),
            "health": self.health.monitor.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict.get("applied", False))
        if self.applied and "config" in state_dict:
            self.config = QuantConfig(**state_dict["config"])
        self.sensitivity = [LayerSensitivity(**r) for r in state_dict.get("sensitivity", [])]
        self.fp16_overflow = dict(state_dict.get("fp16_overflow", {}))
        self.health.monitor.load_state_dict(state_dict.get("health") or {})
