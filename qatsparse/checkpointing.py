"""Restore a compressed model's structure from a checkpoint before its state_dict is loaded."""

from __future__ import annotations

from typing import Any

from torch import nn

#: Top-level checkpoint key where the callbacks record what they changed in the model's structure.
CHECKPOINT_KEY = "qatsparse"


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
    from qatsparse.sparsity.record import restore_pruned_record

    restore_pruned_record(module, checkpoint)
    cfg = (checkpoint.get(CHECKPOINT_KEY) or {}).get("quantization")
    if not cfg or is_quantized(module):
        return False
    quantize_model(module, QuantConfig(**cfg))
    return True
