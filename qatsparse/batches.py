"""How qatsparse reads a batch: which part is the model's input and which the target.

Convention (the common ``(inputs, targets)`` layout): a batch is a tuple/list whose first element is
the input -- a tensor, or a tuple/list of tensors for a model with several inputs -- and whose second
element, if any, is the target (a tensor, or a tuple/list for several outputs). A bare tensor batch is
an input without target. A LightningModule with another layout defines ``batch_inputs(batch)`` and
``batch_targets(batch)`` methods, which take precedence.
"""

from __future__ import annotations

from typing import Any

import torch


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    raise TypeError(
        f"cannot read model inputs from a {type(x).__name__}; define `batch_inputs(batch)` on the LightningModule"
    )


def batch_inputs(module: Any, batch: Any) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs in ``batch``.

    Example:
        >>> [t.shape for t in batch_inputs(None, (torch.zeros(2, 3), torch.zeros(2)))]
        [torch.Size([2, 3])]
    """
    if hasattr(module, "batch_inputs"):
        return _as_tuple(module.batch_inputs(batch))
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        return _as_tuple(batch[0])
    raise TypeError(
        f"cannot read model inputs from a {type(batch).__name__} batch; "
        "define `batch_inputs(batch)` on the LightningModule"
    )


def batch_targets(module: Any, batch: Any) -> tuple[torch.Tensor, ...] | None:
    """The targets in ``batch`` (one per model output), or None when the batch has none.

    Example:
        >>> batch_targets(None, (torch.zeros(2, 3), torch.tensor([1, 2])))[0].tolist()
        [1, 2]
    """
    if hasattr(module, "batch_targets"):
        t = module.batch_targets(batch)
        return None if t is None else _as_tuple(t)
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return _as_tuple(batch[1])
    return None


def example_inputs(module: Any, dataloader: Any = None) -> tuple[torch.Tensor, ...]:
    """Export example: ``module.example_input_array`` (a tuple means several inputs), else the input
    part of the first batch of ``dataloader``."""
    ex = getattr(module, "example_input_array", None)
    if ex is not None:
        return _as_tuple(ex)
    if dataloader is None:
        raise ValueError("set `example_input_array` on the LightningModule or provide a validation dataloader")
    return batch_inputs(module, next(iter(dataloader)))


def as_outputs(y: Any) -> tuple[torch.Tensor, ...]:
    """A model's output as a tuple of tensors (one output -> a 1-tuple)."""
    if isinstance(y, dict):
        return tuple(y.values())
    return _as_tuple(y)
