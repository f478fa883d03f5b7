"""Restore a compressed model's structure from a checkpoint before its state_dict is loaded."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from qatsparse.sparsity.record import set_pruned_record

#: Top-level checkpoint key where the callbacks record what they changed in the model's structure.
CHECKPOINT_KEY = "qatsparse"


def restore_pruned_record(module: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Set the 2:4 record from a checkpoint written by :class:`~qatsparse.TwoFourSparsity`; True when it did.

    :func:`restore_structure` calls it, so ``LightningModule.load_from_checkpoint`` of a sparse checkpoint
    yields a module that ``check_2to4`` checks without further arguments.

    Example:
        >>> m = nn.Linear(16, 8); restore_pruned_record(m, {"qatsparse": {"sparsity": {"pruned_layers": [""]}}})
        True
    """
    state = (checkpoint.get(CHECKPOINT_KEY) or {}).get("sparsity")
    if not state:
        return False
    set_pruned_record(module, state["pruned_layers"])
    return True


def restore_structure(module: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Insert the quantizers a checkpoint's state_dict expects; returns True when it did.

    Call it from ``LightningModule.on_load_checkpoint`` so that ``load_from_checkpoint`` of a QAT
    checkpoint gives the quantized model with its calibrated ``amax`` (the example models do). The
    recorded :class:`~qatsparse.quantization.QuantConfig` (with the layers kept in higher precision)
    determines the whole structure, residual quantizers included, so the strict load matches.
    Sparse checkpoints need nothing: the zeros are in the weights. (Resuming ``trainer.fit`` does not
    need this hook: the QAT callback restores the structure itself.)

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(4, 4))
        >>> restore_structure(m, {"qatsparse": {"quantization": {"precision": "int8"}}})
        True
    """
    from qatsparse.quantization import QuantConfig, is_quantized, quantize_model

    restore_pruned_record(module, checkpoint)
    cfg = (checkpoint.get(CHECKPOINT_KEY) or {}).get("quantization")
    if not cfg or is_quantized(module):
        return False
    quantize_model(module, QuantConfig(**cfg))
    return True


def snapshot_state_dict(module: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A CPU copy of ``module.state_dict()`` that keeps its ``_metadata`` (the per-module versions some
    layers' ``_load_from_state_dict`` check, e.g. torchvision's MNASNet: without them loading fails with
    ``version should be set to 1 or 2``).

    Example:
        >>> snapshot_state_dict(nn.BatchNorm1d(2))._metadata[""]["version"]
        2
    """
    sd = module.state_dict()
    snap: OrderedDict[str, torch.Tensor] = OrderedDict((k, v.detach().cpu().clone()) for k, v in sd.items())
    snap._metadata = copy.deepcopy(getattr(sd, "_metadata", OrderedDict()))  # type: ignore[attr-defined]
    return snap


def with_metadata(state: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """``state`` with state-dict metadata: its own, else the metadata of ``module`` (same architecture) -- for
    snapshots taken before :func:`snapshot_state_dict` kept it.

    Example:
        >>> with_metadata({"weight": torch.ones(2)}, nn.BatchNorm1d(2))._metadata[""]["version"]
        2
    """
    if getattr(state, "_metadata", None) is not None:
        return state
    out: OrderedDict[str, Any] = OrderedDict(state)
    out._metadata = copy.deepcopy(getattr(module.state_dict(), "_metadata", OrderedDict()))  # type: ignore[attr-defined]
    return out
