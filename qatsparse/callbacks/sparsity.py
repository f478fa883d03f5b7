"""TwoFourSparsity: prune eligible layers to 2:4 at a step and keep them 2:4 for the rest of training."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from qatsparse.callbacks._common import notify_before_compression
from qatsparse.sparsity import MaskSet, find_prunable, prune_2to4, sparsity_summary
from qatsparse.sparsity.masks import apply_masks


class TwoFourSparsity(pl.Callback):
    """Magnitude 2:4 pruning of every eligible Conv2d/Linear at ``start_step``; masks held afterwards.

    After pruning, the pruned weights are zeroed again right after every optimizer step (a post-step
    hook on each optimizer, so gradient accumulation, several optimizers, manual optimization and
    AMP-skipped steps are all covered). Masks are saved in the checkpoint and restored on resume.

    Args:
        start_step: optimizer step (``trainer.global_step``) at which to prune; 0 prunes before the
            first step.
        include: regexes of module names to consider (default: all Conv2d/Linear).
        exclude: regexes of module names never pruned (e.g. the classifier, ``["fc"]``).
        make_permanent: at fit end, drop the hooks and leave plain modules with the zeros in place.
        verbose: print the pruning summary.

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
    ) -> None:
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.start_step = int(start_step)
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else []
        self.make_permanent = make_permanent
        self.verbose = verbose
        self.masks: MaskSet | None = None
        self._handles: list[Any] = []
        self._bound: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @property
    def pruned(self) -> bool:
        return self.masks is not None

    @property
    def pruned_layers(self) -> list[str]:
        return list(self.masks.masks) if self.masks else []

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Fail before the first step on an `include` that matches nothing.
        find_prunable(pl_module, self.include, self.exclude)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is not None:  # resumed after pruning
            self._attach(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.masks is None and trainer.global_step >= self.start_step:
            self._prune(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.masks is not None and batch_idx == 0:
            dens = self.masks.density(pl_module)
            total = sum(dens.values()) / max(len(dens), 1)
            pl_module.log("sparsity/pruned_layers_density", total, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is not None and self.make_permanent:
            self.masks.apply(pl_module)
            self._detach()

    # ------------------------------------------------------------------ work
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        notify_before_compression(trainer, pl_module)
        masks = prune_2to4(pl_module, self.include, self.exclude)
        # Every rank computed its masks from the same weights; rank 0's are made authoritative.
        masks.masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.masks.items()}, src=0)
        self.masks = masks
        masks.apply(pl_module)
        self._attach(trainer, pl_module)
        pl_module._qatsparse_pruned = list(masks.masks)  # for check_2to4(module)
        if self.verbose:
            rank_zero_info(self.summary(pl_module))

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        assert self.masks is not None
        self._bound = self.masks.bind(pl_module)
        apply_masks(*self._bound)
        pl_module._qatsparse_pruned = list(self.masks.masks)

        def reapply(*_: Any) -> None:
            apply_masks(*self._bound)  # type: ignore[misc]

        for opt in trainer.optimizers:
            self._handles.append(opt.register_step_post_hook(reapply))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def summary(self, pl_module: pl.LightningModule) -> str:
        """One screen: pruned layers, skipped layers with reasons, share of weights that are 2:4."""
        assert self.masks is not None
        s = sparsity_summary(pl_module)
        lines = [
            f"2:4 sparsity: pruned {len(self.masks.masks)} layers; "
            f"{s['weights_2to4_share']:.1%} of {s['weight_params']:,} Conv/Linear weights are 2:4"
        ]
        lines += [f"  skipped {n}: {why}" for n, why in self.masks.skipped.items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "masks": self.masks.state_dict() if self.masks else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("masks") is not None:
            self.masks = MaskSet.from_state_dict(state_dict["masks"])
