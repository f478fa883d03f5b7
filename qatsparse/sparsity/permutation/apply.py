"""Reorder the tensors of a channel group in place: parameters, buffers, gradients, optimizer state."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qatsparse.sparsity.magnitude import weight_rows
from qatsparse.sparsity.permutation.plan import ChannelGroup, Slot


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by qualified name (shared tensors under each name)."""
    out = dict(model.named_buffers(remove_duplicate=False))
    out.update(model.named_parameters(remove_duplicate=False))
    return out


def reader_matrix(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """|weights| of the group's pruned readers as one ``(rows, group size)`` matrix (the search's input)."""
    tensors = named_tensors(model)
    parts = []
    for r in group.readers:
        rows = weight_rows(tensors[r.weight], 1)  # Conv1d/Conv2d/Linear: input channels on axis 1
        parts.append(rows[:, r.offset : r.offset + group.size].abs().float())
    return torch.cat(parts)


def optimizer_problem(
    model: nn.Module, slots: Sequence[Slot], optimizers: Sequence[torch.optim.Optimizer]
) -> str | None:
    """Why the optimizer state of these slots cannot be permuted with them, or None when it can.

    Per-parameter state of the parameter's own shape (SGD momentum, Adam/AdamW moments, ...) is
    permuted with it, scalars (``step``) are left alone; any other shape (a factored second moment, a
    flattened shard) cannot be mapped and blocks the group.
    """
    tensors = named_tensors(model)
    for slot in slots:
        p = tensors[slot.tensor]
        for opt in optimizers:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.numel() > 1 and value.shape != p.shape:
                    return (
                        f"optimizer state {key!r} of {slot.tensor} has shape {tuple(value.shape)}, not the "
                        f"parameter's {tuple(p.shape)}: it cannot be permuted with it"
                    )
    return None


@torch.no_grad()
def permute_slots(
    model: nn.Module, slots: Sequence[Slot], perm: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer] = ()
) -> None:
    """Reorder every slot in place so that new channel ``j`` is old channel ``perm[j]``.

    Parameters keep their identity (``copy_`` into the same storage), so optimizers, DDP buckets and
    2:4 masks bound to them stay valid; gradients and same-shaped optimizer state move with them.
    """
    tensors = named_tensors(model)
    state_of = {}
    for opt in optimizers:
        for p, st in opt.state.items():
            state_of.setdefault(id(p), []).append(st)
    for slot in slots:
        t = tensors[slot.tensor]
        targets = [t]
        if isinstance(t, nn.Parameter):
            if t.grad is not None:
                targets.append(t.grad)
            for st in state_of.get(id(t), []):
                targets += [
                    v for v in st.values() if isinstance(v, torch.Tensor) and v.shape == t.shape and v.numel() > 1
                ]
        idx = perm.to(t.device)
        for x in targets:
            part = x.narrow(slot.axis, slot.offset, idx.numel())
            part.copy_(part.index_select(slot.axis, idx))


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``perm``.

    Example:
        >>> inverse(torch.tensor([2, 0, 1])).tolist()
        [1, 2, 0]
    """
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv
