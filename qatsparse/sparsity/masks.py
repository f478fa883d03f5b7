"""2:4 masks: in every group of 4 consecutive input-channel weights keep the 2 of largest magnitude."""

from __future__ import annotations

import torch


def _check_weight(weight: torch.Tensor, in_axis: int) -> int:
    if weight.dim() < 2:
        raise ValueError(
            f"expected a weight with at least 2 dims (output and input channels), got shape {tuple(weight.shape)}"
        )
    return in_axis % weight.dim()


def compute_2to4_mask(weight: torch.Tensor, in_axis: int = 1) -> torch.Tensor:
    """Boolean mask keeping the 2 largest-magnitude weights of every group of 4 input channels.

    Groups run along ``in_axis`` (the input channels: dim 1 of a Conv2d weight (O, I, kh, kw) or a Linear
    weight (O, I), dim 0 of a transformers ``Conv1D`` weight (I, O)) for every other index (output
    channel, kernel tap) -- the layout TensorRT's sparse kernels require. Ties are broken by position
    (lower index wins).

    Example:
        >>> compute_2to4_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]])).tolist()
        [[False, True, True, False]]
    """
    axis = _check_weight(weight, in_axis)
    if weight.shape[axis] % 4:
        raise ValueError(f"input channels ({weight.shape[axis]}) must be a multiple of 4 for 2:4 sparsity")
    w = weight.detach().abs().float().movedim(axis, -1)
    groups = w.reshape(-1, 4)
    # A stable descending sort (not topk) so that ties go to the lower index on every device: ranks
    # and resumed runs then agree on the mask bit for bit.
    keep = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return mask.reshape(w.shape).movedim(-1, axis).contiguous()


def is_2to4(weight: torch.Tensor, in_axis: int = 1) -> bool:
    """True when every group of 4 input-channel weights holds at least 2 zeros.

    Example:
        >>> is_2to4(torch.tensor([[0.0, 1.0, 0.0, 2.0]])), is_2to4(torch.ones(1, 4))
        (True, False)
    """
    return worst_group_nonzeros(weight, in_axis) <= 2


def worst_group_nonzeros(weight: torch.Tensor, in_axis: int = 1) -> int:
    """Largest count of nonzeros in any group of 4 input-channel weights (4 when channels don't divide)."""
    return worst_group(weight, in_axis)[0]


def worst_group(weight: torch.Tensor, in_axis: int = 1) -> tuple[int, tuple[int, ...]]:
    """The largest count of nonzeros in a group of 4 input-channel weights, and where that group starts.

    The index is into ``weight`` itself (``(o, i, kh, kw)`` for a Conv2d, ``(o, i)`` for a Linear), its
    ``in_axis`` entry being the group's first input channel. When the input channels don't divide by 4
    the count is 4 and the index is ``()``.

    Example:
        >>> worst_group(torch.tensor([[1.0, 0.0, 0.0, 2.0, 1.0, 1.0, 1.0, 0.0]]))
        (3, (0, 4))
    """
    if weight.dim() < 2 or weight.shape[in_axis % weight.dim()] % 4:
        return 4, ()
    axis = in_axis % weight.dim()
    w = weight.detach().movedim(axis, -1)
    nz = (w != 0).reshape(-1, 4).sum(1)
    if not nz.numel():
        return 0, ()
    flat = int(nz.argmax())
    idx = [int(i) for i in torch.unravel_index(torch.tensor(flat * 4), w.shape)]
    idx.insert(axis, idx.pop())  # back to the weight's own layout
    return int(nz[flat]), tuple(idx)


@torch.no_grad()
def apply_masks(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Zero the pruned weights in place, in one fused call (no ``weight * mask`` copies)."""
    if weights:
        torch._foreach_mul_(weights, masks)
