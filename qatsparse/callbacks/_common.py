"""Glue shared by the callbacks: telling others that compression starts, calibration batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch

from qatsparse.batches import batch_inputs, call_model
from qatsparse.loaders import sampler_state_kept, separate_pass, train_dataloader


def notify_before_compression(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Call ``on_before_compression`` of every callback that has it (the export callback snapshots the
    dense FP32 reference there) -- before the first pruning or quantization changes the model."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        hook = getattr(cb, "on_before_compression", None)
        if hook is not None:
            hook(trainer, pl_module)


def before_wrapping(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Every qatsparse callback's ``setup`` (before a strategy wraps the model): under FSDP, contiguous
    parameters, so that a resumed run restores the optimizer state in the right order
    (:func:`~qatsparse.sharding.contiguous_parameters`); under DDP, size-1 dimensions strided like the
    gradients ATen writes (:func:`~qatsparse.sharding.ddp_gradient_layout`)."""
    from pytorch_lightning.utilities import rank_zero_info

    from qatsparse.sharding import contiguous_parameters, ddp_gradient_layout

    ddp_gradient_layout(trainer, pl_module)  # same bytes, no notice needed
    changed = contiguous_parameters(trainer, pl_module)
    if changed:
        rank_zero_info(
            f"qatsparse: made {len(changed)} channels_last parameter(s) contiguous before FSDP wraps the model "
            f"(e.g. {changed[0]}): FSDP restores their optimizer state in the wrong order on resume otherwise "
            "(docs/distributed.md); inputs may stay channels_last"
        )


def find_callback(trainer: pl.Trainer, cls: type) -> Any | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)  # type: ignore[attr-defined]


def train_batches(trainer: pl.Trainer, n: int) -> Iterator[Any]:
    """The first ``n`` batches of a fresh pass over the training dataloader, on the module's device; the
    training pass is not disturbed (see :func:`qatsparse.loaders.peek`)."""
    loader = train_dataloader(trainer)
    with sampler_state_kept(loader):
        for batch in itertools.islice(iter(separate_pass(loader)), n):
            yield trainer.strategy.batch_to_device(batch)


_separate_pass = separate_pass


def forward_batch(pl_module: pl.LightningModule, batch: Any) -> Any:
    """Run the module's forward on the input part of ``batch`` (see :mod:`qatsparse.batches`)."""
    return call_model(pl_module, batch_inputs(pl_module, batch))


def rng_isolated(device: torch.device):
    """A context in which random draws (e.g. shuffling for calibration) leave the training RNG as it was."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def load_checkpoint_for_setup(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The checkpoint ``trainer.fit(ckpt_path=...)`` restores, read early so the model's structure can be made
    to match it before Lightning loads the state_dict. ``trainer.ckpt_path`` is set only once Lightning
    starts restoring (after ``setup`` in Lightning 2.6), so callers also try again from a
    ``load_state_dict`` pre-hook; None when no checkpoint is being restored."""
    path = getattr(trainer, "ckpt_path", None)
    if not path:
        return None
    from lightning_fabric.utilities.cloud_io import _load

    return _load(path, map_location="cpu", weights_only=False)


class HealthWatch:
    """The compression callbacks' glue to :class:`qatsparse.health.HealthMonitor`: baseline gradient norms in
    the steps before ``event_step``, then a check of every step's gradients and loss in the window after it,
    with a warning naming the step and the layers at the first problem.

    Inside the window nothing waits for the GPU: a step's gradient norms and loss are copied to the host
    without blocking and checked at the next step (or at train end, or before a report or checkpoint), still
    under their own step number. A host sync there would stall the GPU every step of the window (the
    CPU can no longer queue the next work ahead), which the paired benchmark times.
    """

    def __init__(self) -> None:
        from qatsparse.health import HealthMonitor

        self.monitor = HealthMonitor()
        #: (step, 0 for gradients / 1 for the loss, pending value, model) not checked yet, oldest first
        self._pending: list[tuple[int, int, Any, Any]] = []

    def started(self, trainer: pl.Trainer, what: str) -> None:
        if "16" in str(trainer.precision) and "bf16" not in str(trainer.precision):
            self.monitor.nonfinite_patience = 3  # GradScaler skips a few non-finite steps on its own
        from qatsparse.health import forget_parameters

        forget_parameters(trainer.lightning_module)  # the compression may have changed its modules
        self.monitor.start(f"{what} at step {trainer.global_step}", trainer.global_step)

    def before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event_step: int) -> None:
        from qatsparse.health import launch_grad_norms

        self.drain()  # the steps before: their numbers are on the host by now
        step = trainer.global_step
        if self.monitor.wants_baseline(step, event_step):
            self.monitor.record_baseline(pl_module, step)  # a few steps before the event: read at once
        elif self.monitor.watching(step):
            pending = launch_grad_norms(pl_module, step)
            if pending is not None:
                self._pending.append((step, 0, pending, pl_module))

    def after_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, event_step: int) -> None:
        from qatsparse.health import PendingValues

        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        step = trainer.global_step - 1  # the step this batch's optimizer step was
        if not isinstance(loss, torch.Tensor):
            return
        if self.monitor.wants_baseline(step, event_step):
            self.monitor.record_loss(float(loss.detach()))
        elif self.monitor.watching(step):
            self._pending.append((step, 1, PendingValues(loss), pl_module))

    def drain(self) -> None:
        """Check what is pending, in step order (a step's gradients before its loss); warn at the first event."""
        pending, self._pending = self._pending, []  # appended in step order: a step's gradients, then its loss
        layers_of: dict[int, dict[str, float]] = {}
        for step, kind, value, model in pending:
            if kind == 0:
                layers_of[step] = value.layers()
                self._warn(self.monitor.check_gradients(model, step, layers=layers_of[step]))
            else:
                self._warn(self.monitor.check_loss(value.get()[0], model, step, layers=layers_of.get(step)))

    @staticmethod
    def _warn(event: Any) -> None:
        if event is not None:
            from pytorch_lightning.utilities import rank_zero_warn

            rank_zero_warn(event.message())
