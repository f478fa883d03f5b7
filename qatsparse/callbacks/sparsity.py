"""TwoFourSparsity: prune eligible layers to 2:4 at a step and keep them 2:4 for the rest of training."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from qatsparse.batches import batch_inputs
from qatsparse.callbacks._common import HealthWatch, before_wrapping, find_callback, notify_before_compression
from qatsparse.checkpointing import CHECKPOINT_KEY
from qatsparse.lightning_compat import Callback
from qatsparse.patterns import compile_patterns
from qatsparse.preflight import Checks, FitData, check_int, check_start_step, run_preflight
from qatsparse.sharding import check_unsharded, full_weights, local_masks
from qatsparse.sparsity import MaskSet, compute_masks, find_prunable, format_summary
from qatsparse.sparsity.magnitude import kept_magnitude
from qatsparse.sparsity.masks import apply_masks
from qatsparse.sparsity.permutation import (
    Move,
    SearchConfig,
    apply_channel_permutations,
    search_channel_permutations,
    undo_channel_permutations,
)
from qatsparse.sparsity.permutation.verify import example_slice, max_difference, model_outputs
from qatsparse.sparsity.record import set_pruned_record
from qatsparse.sparsity.summary import format_kept_magnitude, kept_report, sparsity_metrics_over_ranks


def _example_inputs(pl_module: pl.LightningModule, batch: Any) -> tuple[Any, ...] | None:
    """Up to two samples of the model's input: from the batch, else ``example_input_array``, else None."""
    try:
        return example_slice(batch_inputs(pl_module, batch))
    except TypeError:
        x = getattr(pl_module, "example_input_array", None)
        return None if x is None else example_slice(tuple(x) if isinstance(x, (list, tuple)) else (x,))


class TwoFourSparsity(Callback):
    """Magnitude 2:4 pruning of every eligible weight at ``start_step``; masks held afterwards.

    Eligible: Conv1d/Conv2d/Linear weights, ``nn.MultiheadAttention`` input/output projections and
    transformers ``Conv1D`` weights that TensorRT's sparse kernels can use (see
    :mod:`qatsparse.sparsity.weights`); everything else is named in the summary with the reason.

    After pruning, the pruned weights are zeroed again right after every optimizer step (a post-step
    hook on each optimizer, so gradient accumulation, several optimizers, manual optimization and
    AMP-skipped steps are all covered). Masks are saved in the checkpoint and restored on resume; under
    DDP and FSDP rank 0's masks are broadcast so that every rank holds the same ones (under FSDP they are
    computed on the full weights and each rank keeps its shard of them: docs/distributed.md). See
    docs/sparsity.md.

    Args:
        start_step: optimizer step (``trainer.global_step``) at which to prune; 0 prunes before the
            first step. A step the Trainer never reaches is an error before the first step.
        include: patterns of weight keys to consider (default: all): regexes searched in the key, or globs
            such as ``"*head*"`` (:mod:`qatsparse.patterns`); a key is the module name, or
            ``module.parameter`` for attention's ``in_proj_weight``.
        exclude: patterns of weight keys never pruned (e.g. the classifier, ``["fc"]``). An ``include`` or
            ``exclude`` pattern that matches no prunable weight is an error before the first step.
        make_permanent: at fit end, drop the optimizer hooks and leave plain modules with the zeros in
            place (the default). ``False`` keeps the hooks, so steps of the same optimizers after ``fit``
            keep the masks too.
        verbose: print the one-screen pruning summary.
        permute: before computing the masks, reorder the input channels of the pruned layers (and
            the output channels of the layers feeding them, so the network computes the same
            function) so that 2:4 keeps more of the weights' magnitude (apex ASP's channel
            permutation, see docs/sparsity.md "Channel permutation"). Done once, at ``start_step``,
            baked into the weights (no extra ops in the export); the summary and the report give the
            magnitude kept with and without it, and the layers that could not be permuted with why.
        permute_search: budget of the permutation search (:class:`~qatsparse.sparsity.permutation.SearchConfig`;
            default ``SearchConfig()``).

    Example:
        >>> cb = TwoFourSparsity(start_step=100, exclude=["fc"])
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=300)  # doctest: +SKIP
    """

    def __init__(
        self,
        start_step: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        make_permanent: bool = True,
        verbose: bool = True,
        permute: bool = False,
        permute_search: SearchConfig | None = None,
    ) -> None:
        self.start_step = check_int("TwoFourSparsity", "start_step", start_step, 0)
        if not isinstance(permute, bool):
            raise ValueError(f"TwoFourSparsity: permute must be True or False, got {permute!r}")
        if permute_search is not None and not isinstance(permute_search, SearchConfig):
            raise ValueError(
                "TwoFourSparsity: permute_search must be a qatsparse.sparsity.permutation.SearchConfig, "
                f"got {type(permute_search).__name__}"
            )
        self.include = [include] if isinstance(include, str) else (list(include) if include else None)
        self.exclude = [exclude] if isinstance(exclude, str) else (list(exclude) if exclude else [])
        compile_patterns(self.include, f"TwoFourSparsity(include={self.include!r})")
        compile_patterns(self.exclude, f"TwoFourSparsity(exclude={self.exclude!r})")
        self.make_permanent = make_permanent
        self.verbose = verbose
        self.permute = permute
        self.permute_search = permute_search or SearchConfig()
        #: per pruned layer: magnitude kept by plain 2:4 and after the permutation (see :meth:`kept_magnitude`)
        self.kept: dict[str, dict[str, float | None]] = {}
        #: what the permutation did (groups, time, layers not permuted with reasons); None if not run
        self.permutation: dict[str, Any] | None = None
        #: the permutations applied in this process (rank 0's, on every rank); not kept in checkpoints
        self.applied_moves: list[Move] = []
        self.masks: MaskSet | None = None
        self.pruned_at_step: int | None = None
        self._handles: list[Any] = []
        self._hooked: list[int] = []
        self._bound: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.health = HealthWatch()  # a loss or gradient blowing up after pruning is reported at once

    @property
    def pruned(self) -> bool:
        return self.masks is not None

    @property
    def pruned_layers(self) -> list[str]:
        return list(self.masks.masks) if self.masks else []

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        before_wrapping(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_preflight(trainer, pl_module, caller=self)

    def _check_order(self, trainer: pl.Trainer) -> None:
        """The permutation must come before quantizers are inserted (it does not move their calibrated amax)."""
        from qatsparse.callbacks.quantization import QuantizationAwareTraining

        qat = find_callback(trainer, QuantizationAwareTraining)
        if qat is None or qat.applied:
            return
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        if qat.start_step < self.start_step or (
            qat.start_step == self.start_step and callbacks.index(qat) < callbacks.index(self)
        ):
            raise ValueError(
                f"TwoFourSparsity(permute=True, start_step={self.start_step}) would permute channels after "
                f"QuantizationAwareTraining(start_step={qat.start_step}) has calibrated: set "
                f"QuantizationAwareTraining.start_step >= {self.start_step} (TwoFourSparsity listed first when "
                "equal), or permute=False"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is not None:  # resumed after pruning, or a second fit with this callback
            self._attach(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.masks is None:
            if trainer.global_step >= self.start_step:
                self._prune(trainer, pl_module, batch)
        elif self._hooked != [id(o) for o in trainer.optimizers]:  # optimizers were replaced
            self._attach(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.health.before_optimizer_step(trainer, pl_module, self.start_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.health.after_batch(trainer, pl_module, outputs, self.start_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Counted on each rank's shards under FSDP: no full weights gathered every epoch (what FSDP users cannot
        # afford); identical on every rank. sync_dist only keeps Lightning's DDP warning quiet.
        metrics = sparsity_metrics_over_ranks(trainer, pl_module, self.pruned_layers)
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.health.drain()  # the last step's checks, before anything reports

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is not None and self.make_permanent:
            if self._bound is not None:
                # Lightning's teardown (before on_fit_end) moves a single device's model to the CPU.
                weights, masks = self._bound
                apply_masks(weights, [m.to(w.device) for w, m in zip(weights, masks)])
            else:
                self.masks.apply(pl_module)
            self._detach()
            self._bound = None
            self.masks = MaskSet.from_state_dict(self.masks.state_dict())  # bool, on the CPU

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Read back by qatsparse.restore_structure, so that load_from_checkpoint knows the 2:4 layers.
        if self.masks is not None:
            checkpoint.setdefault(CHECKPOINT_KEY, {})["sparsity"] = {"pruned_layers": self.pruned_layers}

    # ------------------------------------------------------------------ checks
    def preflight(self, check: Checks, trainer: pl.Trainer, pl_module: pl.LightningModule, data: FitData) -> None:
        """Before step 0 (see :mod:`qatsparse.preflight`): the pruning step is reached, the patterns match."""
        check(check_start_step, trainer, "TwoFourSparsity", self.start_step, done=self.masks is not None)
        if self.masks is None:
            elig = check(self._eligible, pl_module)
            if elig is not None and not elig.eligible:
                rank_zero_warn(f"TwoFourSparsity: no layer is eligible for 2:4 pruning; skipped: {elig.skipped}")
            if self.permute:
                check(self._check_order, trainer)
                check(check_unsharded, trainer, "TwoFourSparsity(permute=True)", "use permute=False or strategy='ddp'")

    def _eligible(self, pl_module: pl.LightningModule) -> Any:
        try:
            return find_prunable(pl_module, self.include, self.exclude)
        except ValueError as e:
            raise ValueError(f"TwoFourSparsity: {e}") from None

    # ------------------------------------------------------------------ work
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any = None) -> None:
        # FSDP: the reference snapshot, the magnitudes and the masks see the full weights (permute is refused there)
        with full_weights(trainer):
            notify_before_compression(trainer, pl_module)
            eligible = list(find_prunable(pl_module, self.include, self.exclude).eligible)
            plain = kept_magnitude(pl_module, eligible)
            if self.permute:
                # Rank 0 searches, every rank applies its moves (weights, BN statistics, optimizer state),
                # checks the outputs are unchanged, and undoes them all if any rank sees a difference.
                self.permutation = self._permute(trainer, pl_module, batch, eligible)
            after = kept_magnitude(pl_module, eligible) if self.permute else {}
            self.kept = kept_report(plain, after)
            masks = compute_masks(pl_module, self.include, self.exclude)
        # Rank 0's masks are authoritative; broadcast before any weight is zeroed, so that a rank whose
        # weights differ (nondeterminism) still ends with exactly rank 0's zero pattern.
        masks.masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.masks.items()}, src=0)
        self.masks = masks
        self.pruned_at_step = trainer.global_step
        self._attach(trainer, pl_module)
        self.health.started(trainer, "2:4 pruning")
        if self.verbose:
            with full_weights(trainer):
                text = self.summary(pl_module)
            rank_zero_info(text)

    def _permute(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, eligible: list[str]
    ) -> dict[str, Any]:
        """Search (rank 0), broadcast, apply on every rank, verify; returns the permutation's summary.

        Nothing here may end the run: any failure leaves the model unpermuted, with a warning."""
        from qatsparse.quantization import is_quantized

        if is_quantized(pl_module):  # quantizers were inserted outside the callbacks' order check
            return self._skip("the model already holds quantizers (the permutation must come before QAT)")
        inputs = _example_inputs(pl_module, batch)
        payload: dict[str, Any] | None = None
        if trainer.is_global_zero:
            try:
                if inputs is None:
                    raise ValueError("no example input: define batch_inputs(batch) or example_input_array")
                result = search_channel_permutations(
                    pl_module, inputs, eligible, trainer.optimizers, self.permute_search
                )
                payload = {"moves": [m.to_dict() for m in result.moves], "summary": result.summary()}
            except Exception as e:
                payload = {"moves": [], "summary": {}, "error": f"{type(e).__name__}: {e}"}
        payload = trainer.strategy.broadcast(payload, src=0)
        if payload.get("error"):
            return self._skip(f"the search failed: {payload['error']}")
        moves = [Move.from_dict(d) for d in payload["moves"]]
        try:
            before = model_outputs(pl_module, inputs) if inputs is not None else None
        except Exception:
            before = None
        if not trainer.strategy.reduce_boolean_decision(before is not None, all=True):
            return self._skip("the model's forward did not run on the example input, so the result cannot be checked")
        apply_channel_permutations(pl_module, moves, trainer.optimizers)
        self.applied_moves = moves
        try:
            diff, scale = max_difference(before, model_outputs(pl_module, inputs))  # type: ignore[arg-type]
        except Exception:
            diff, scale = float("inf"), 0.0
        tol = (1e-3 if next(pl_module.parameters()).dtype == torch.float32 else 5e-2) * max(scale, 1e-6)
        if not trainer.strategy.reduce_boolean_decision(diff <= tol, all=True):
            undo_channel_permutations(pl_module, moves, trainer.optimizers)
            self.applied_moves = []
            return self._skip(f"the permuted model's outputs moved by {diff:.3g} (scale {scale:.3g}): undone")
        return {**payload["summary"], "max_output_difference": diff}

    @staticmethod
    def _skip(why: str) -> dict[str, Any]:
        rank_zero_warn(f"TwoFourSparsity(permute=True): not permuted: {why}")
        return {"skipped": why}

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        assert self.masks is not None
        with full_weights(trainer):
            weights, full = self.masks.bind(pl_module)
        # Under FSDP each rank zeroes its shard of every weight with its shard of the mask (every rank calls this).
        self._bound = (weights, local_masks(trainer, weights, full))
        apply_masks(*self._bound)
        set_pruned_record(pl_module, self.pruned_layers)

        def reapply(*_: Any) -> None:
            apply_masks(*self._bound)  # type: ignore[misc]

        for opt in trainer.optimizers:
            self._handles.append(opt.register_step_post_hook(reapply))
        self._hooked = [id(o) for o in trainer.optimizers]

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._hooked = [], []

    def summary(self, pl_module: pl.LightningModule) -> str:
        """One screen: pruned layers, skipped layers with reasons, share of weights pruned."""
        assert self.masks is not None
        text = format_summary(self.masks, pl_module)
        if self.kept:
            text += "\n" + format_kept_magnitude(self.kept, self.permutation)
        return text

    def kept_magnitude(self) -> dict[str, Any]:
        """Magnitude kept by 2:4 (sum of kept ``|w|`` / sum of ``|w|``) per pruned layer and overall, plain and
        with the permutation (``None`` when ``permute=False``), and what the permutation did; for the report.

        Example:
            >>> TwoFourSparsity().kept_magnitude()
            {}
        """
        if not self.kept:
            return {}
        from qatsparse.sparsity.summary import overall_kept

        return {
            "kept_magnitude": {"overall": overall_kept(self.kept), "layers": self.kept},
            "permutation": self.permutation,
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self.health.drain()  # a checkpoint holds every event up to its step
        return {
            "start_step": self.start_step,
            "pruned_at_step": self.pruned_at_step,
            "masks": self.masks.state_dict() if self.masks else None,
            "kept": self.kept,
            "permutation": self.permutation,
            "health": self.health.monitor.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("masks") is not None:
            self.masks = MaskSet.from_state_dict(state_dict["masks"])
            self.pruned_at_step = state_dict.get("pruned_at_step")
            # The permuted weights are in the checkpoint's state_dict: nothing is permuted again.
            self.kept = state_dict.get("kept") or {}
            self.permutation = state_dict.get("permutation")
        self.health.monitor.load_state_dict(state_dict.get("health") or {})
