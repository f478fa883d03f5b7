"""Sharded parameters under Lightning's FSDP strategy: the full weights, and each rank's shard of a mask.

Lightning 2.6's ``strategy="fsdp"`` (:class:`~pytorch_lightning.strategies.FSDPStrategy`) wraps the
LightningModule in PyTorch's ``FullyShardedDataParallel`` (FSDP1) with ``use_orig_params=True``: outside
the forward and backward every rank holds only a flat 1-D slice of each weight, and
``pl_module.named_parameters()`` shows those slices (a weight another rank holds entirely is empty
here). qatsparse works on the full weights where it needs their shape or values -- computing 2:4
masks, inserting and calibrating quantizers, the preflight forward, the export -- by entering
:func:`full_weights` on every rank (``FullyShardedDataParallel.summon_full_params``, a collective), and
keeps each rank's shard 2:4 after every optimizer step with the part of each mask that the rank holds
(:func:`local_masks`). Without FSDP both are no-ops, so the callbacks call them unconditionally.

Supported: the whole LightningModule as one FSDP unit (``FSDPStrategy`` without ``auto_wrap_policy`` or
activation checkpointing), any ``sharding_strategy``, ``state_dict_type="full"`` or ``"sharded"``.
:func:`check_strategy` names what is not, before step 0 (docs/distributed.md).

Example:
    >>> import torch
    >>> from torch import nn
    >>> m = nn.Linear(8, 4)
    >>> with full_weights(None):  # no FSDP: the module as it is
    ...     tuple(m.weight.shape)
    (4, 8)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn

#: The state_dict prefix of the module inside FSDP's wrapper (``torch.distributed.fsdp`` names it so).
FSDP_PREFIX = "_fsdp_wrapped_module."


def fsdp_root(trainer: Any) -> nn.Module | None:
    """The ``FullyShardedDataParallel`` root that wraps the Trainer's LightningModule, or None (no FSDP)."""
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, FSDPStrategy):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = getattr(strategy, "model", None)
    return model if isinstance(model, FSDP) else None


def is_sharded(trainer: Any) -> bool:
    """Whether the Trainer's model is wrapped by FSDP (its parameters are shards outside forward/backward)."""
    return fsdp_root(trainer) is not None


@contextlib.contextmanager
def full_weights(trainer: Any, writeback: bool = False, rank0_only: bool = False) -> Iterator[None]:
    """Inside, the LightningModule's parameters are the full (unsharded) weights on every rank (only on rank 0
    with ``rank0_only``, offloaded to the CPU there). Changes are written back to the shards with
    ``writeback=True``. Every rank must enter it (FSDP gathers the shards). Re-entrant: inside, a nested call
    changes nothing. Without FSDP, does nothing."""
    root = fsdp_root(trainer)
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if getattr(root, "_qatsparse_full", False):  # already inside: FSDP does not nest summon_full_params
        yield
        return
    with FSDP.summon_full_params(
        root, writeback=writeback, rank0_only=rank0_only, offload_to_cpu=rank0_only, recurse=True
    ):
        root._qatsparse_full = True
        try:
            yield
        finally:
            root._qatsparse_full = False


@torch.no_grad()
def local_masks(trainer: Any, weights: list[nn.Parameter], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """``masks`` (full shape, one per weight of ``weights``) cut to the part of each weight this rank holds.

    Under FSDP each full mask is written into its weight with the full weights gathered, FSDP scatters
    them to the shards, each rank reads its part, and the weights are put back: only FSDP's public API
    (``summon_full_params(writeback=True)``), whatever layout its flat parameters use. Every rank must
    call it. Without FSDP the masks are returned as they are.
    """
    if not is_sharded(trainer):
        return masks
    with full_weights(trainer, writeback=True):
        kept = [w.detach().clone() for w in weights]
        for w, m in zip(weights, masks):
            if tuple(m.shape) != tuple(w.shape):
                raise ValueError(f"a mask of shape {tuple(m.shape)} for a weight of shape {tuple(w.shape)}")
            w.copy_(m.to(device=w.device, dtype=w.dtype))
    parts = [w.detach().clone() for w in weights]  # this rank's shard of each mask (0/1, exact in any dtype)
    with full_weights(trainer, writeback=True):
        for w, k in zip(weights, kept):
            w.copy_(k)
    return parts


def check_strategy(trainer: Any, pl_module: nn.Module) -> None:
    """The Trainer's strategy is one qatsparse supports; else a ValueError naming the setting and the fix."""
    strategy = getattr(trainer, "strategy", None)
    name = type(strategy).__name__
    if name == "ModelParallelStrategy":
        raise ValueError(
            "ModelParallelStrategy (FSDP2 fully_shard / tensor parallel in configure_model) is not supported by "
            "qatsparse: use strategy='fsdp' (FSDPStrategy: FullyShardedDataParallel over the whole LightningModule) "
            "or strategy='ddp' (docs/distributed.md)"
        )
    if not isinstance(strategy, FSDPStrategy):
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not strategy.kwargs.get("use_orig_params", True):
        raise ValueError(
            "FSDPStrategy(use_orig_params=False): qatsparse needs the original parameters (masks and quantizers "
            "are attached per layer): leave use_orig_params=True, Lightning's default"
        )
    nested = [n for n, m in pl_module.named_modules() if n and isinstance(m, FSDP)]
    wrapped = [n for n, m in pl_module.named_modules() if type(m).__name__ == "CheckpointWrapper"]
    if nested or wrapped:
        what = (
            f"FSDP units inside the module ({', '.join(nested[:3])}{', ...' if len(nested) > 3 else ''}: from "
            "auto_wrap_policy or wrapping in configure_model)" if nested else
            f"activation-checkpoint wrappers ({', '.join(wrapped[:3])}: from activation_checkpointing_policy)"
        )  # fmt: skip
        raise ValueError(
            f"FSDPStrategy with {what}: qatsparse supports the whole LightningModule as one FSDP unit; use "
            "FSDPStrategy() without auto_wrap_policy and activation_checkpointing_policy, or strategy='ddp' "
            "(docs/distributed.md)"
        )


def check_full_state_dict(trainer: Any, owner: str) -> None:
    """``owner`` (``"TensorRTExport"`` or ``"QuantizationAwareTraining"``) needs FSDP to save full state dicts:
    the export writes ``dirpath/model.ckpt`` as one file that a single process exports from, and the quantizers
    of a resumed QAT run are rebuilt while a full state dict loads (a sharded load only fills the keys that
    exist before it)."""
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") != "full":
        why = (
            "the export saves the trained model as one file (dirpath/model.ckpt) that a single process exports from"
            if owner == "TensorRTExport" else
            "a sharded checkpoint cannot restore the quantizers' calibrated amax on resume"
        )  # fmt: skip
        raise ValueError(
            f"{owner} with FSDPStrategy(state_dict_type='sharded'): {why}; use FSDPStrategy(state_dict_type='full')"
        )


class CPUFSDPStrategy(FSDPStrategy):
    """:class:`~pytorch_lightning.strategies.FSDPStrategy` on CPU processes (gloo), for tests and smoke runs.

    Lightning 2.6 refuses ``strategy="fsdp"`` with ``accelerator="cpu"`` (an exact type check on
    ``FSDPStrategy``) and passes ``device_id=None``, which PyTorch's FSDP refuses on a machine without an
    accelerator ("FSDP needs a non-CPU accelerator device"). This subclass passes ``device_id=cpu``; all the
    rest (sharding, gathering, checkpoints) is Lightning's and PyTorch's own code.

    Example:
        >>> trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=CPUFSDPStrategy())  # doctest: +SKIP
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if any(isinstance(m, FSDP) for m in model.modules()):
            return super()._setup_model(model)
        cpu = torch.device("cpu")
        return FSDP(module=model, sharding_strategy=self.sharding_strategy, device_id=cpu, **self.kwargs)


__all__ = [
    "FSDP_PREFIX",
    "CPUFSDPStrategy",
    "check_full_state_dict",
    "check_strategy",
    "fsdp_root",
    "full_weights",
    "is_sharded",
    "local_masks",
]
