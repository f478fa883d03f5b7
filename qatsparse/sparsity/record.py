"""Which layers of a module are 2:4: recorded on the module and in checkpoints, read by check_2to4."""

from __future__ import annotations

from typing import Any

from torch import nn

#: Attribute of a module holding the names of its pruned (2:4) layers.
PRUNED_ATTR = "_qatsparse_pruned"


def set_pruned_record(module: nn.Module, layers: list[str]) -> None:
    """Record ``layers`` as the 2:4 layers of ``module`` (read by ``check_2to4(module)``)."""
    setattr(module, PRUNED_ATTR, list(layers))


def pruned_record(module: nn.Module) -> list[str] | None:
    """The recorded 2:4 layers of ``module``, or None when nothing was recorded.

    Example:
        >>> m = nn.Linear(16, 8); set_pruned_record(m, [""]); pruned_record(m)
        ['']
    """
    layers = getattr(module, PRUNED_ATTR, None)
    return list(layers) if layers is not None else None


def restore_pruned_record(module: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Set the record from a checkpoint written by :class:`~qatsparse.TwoFourSparsity`; True when it did.

    :func:`qatsparse.restore_structure` calls it, so ``LightningModule.load_from_checkpoint`` of a
    sparse checkpoint yields a module that ``check_2to4`` checks without further arguments.

    Example:
        >>> m = nn.Linear(16, 8); restore_pruned_record(m, {"qatsparse": {"sparsity": {"pruned_layers": [""]}}})
        True
    """
    from qatsparse.checkpointing import CHECKPOINT_KEY

    state = (checkpoint.get(CHECKPOINT_KEY) or {}).get("sparsity")
    if not state:
        return False
    set_pruned_record(module, state["pruned_layers"])
    return True
