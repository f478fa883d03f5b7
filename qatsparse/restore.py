"""Restoring a finished run from its checkpoint: the model with its masks and quantizers, the dense
reference and what the callbacks recorded -- what ``qatsparse export``/``validate`` and
:meth:`TensorRTExport.export_checkpoint <qatsparse.TensorRTExport.export_checkpoint>` start from.

The callbacks are passed in (the caller finds or makes them), so this module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qatsparse.checkpointing import CHECKPOINT_KEY, read_checkpoint, restore_structure
from qatsparse.lightning_compat import is_lightning_module
from qatsparse.quantization import QuantConfig, quantize_model
from qatsparse.sparsity import MaskSet


@dataclass
class RestoredRun:
    """A model restored from a checkpoint with what the callbacks had recorded in it.

    Example:
        >>> RestoredRun(nn.Linear(2, 2), None).pruned_layers
        []
    """

    model: nn.Module
    reference: nn.Module | None
    pruned_layers: list[str] = field(default_factory=list)
    skipped_layers: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)


def restore_run(
    model: nn.Module,
    ckpt_path: str | Path | None,
    export_cb: Any,
    sparsity_cb: Any,
    qat_cb: Any,
    weights_only: bool = False,
) -> RestoredRun:
    """Load ``ckpt_path`` into ``model`` (inserting quantizers first for a QAT checkpoint) and read the
    dense reference, the pruned layers and the quantization settings the callbacks saved in it.

    Args:
        model: the module to load into.
        ckpt_path: a Lightning checkpoint or a plain state_dict; None restores nothing.
        export_cb, sparsity_cb, qat_cb: the run's ``TensorRTExport``, ``TwoFourSparsity`` and
            ``QuantizationAwareTraining`` (their states are read from the checkpoint by their keys).
        weights_only: ``torch.load(weights_only=...)``.

    Example:
        >>> restore_run(nn.Linear(2, 2), None, None, None, None).reference is None
        True
    """
    if ckpt_path is None:
        return RestoredRun(model, None)
    ckpt = read_checkpoint(ckpt_path, weights_only=weights_only)
    if is_lightning_module(model):
        model.on_load_checkpoint(ckpt)
    restore_structure(model, ckpt)
    model.load_state_dict(ckpt["state_dict"])
    states = ckpt.get("callbacks") or {}
    run = RestoredRun(model, None)

    if export_cb.state_key in states:
        export_cb.load_state_dict(states[export_cb.state_key])
        run.reference = export_cb.reference_model(model)
    sparsity_state = states.get(sparsity_cb.state_key) or {}
    if sparsity_state.get("masks"):
        masks = MaskSet.from_state_dict(sparsity_state["masks"])
        run.pruned_layers, run.skipped_layers = list(masks.masks), dict(masks.skipped)
    qcfg = (ckpt.get(CHECKPOINT_KEY) or {}).get("quantization")
    if qcfg:
        qat_cb.load_state_dict({"applied": True})
        qat_cb.config = QuantConfig(**qcfg)
        qat_cb.summary = quantize_model(model, qat_cb.config)  # idempotent: reports what is quantized
        run.quantization = qat_cb.report(model)
    return run
