"""Which layers of a module are 2:4: recorded on the module, read by check_2to4 (the checkpoint side is
:func:`qatsparse.checkpointing.restore_pruned_record`)."""

from __future__ import annotations

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
