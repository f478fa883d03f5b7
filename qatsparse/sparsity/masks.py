"""2:4 masks: in every group of 4 consecutive input-channel weights keep the 2 of largest magnitude."""

from __future__ import annotations

import torch
from torch import nn

#: Layer types whose weights qatsparse prunes: the types TensorRT runs with sparse kernels.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def _to_groups_layout(weight: torch.Tensor) -> torch.Tensor:
    """Move the input-channel axis last: (O, I, kh, kw) -> (O, kh, kw, I); Linear (O, I) stays."""
    return weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight


def _from_groups_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2) if like.dim() == 4 else t


def compute_2to4_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest-magnitude weights of every group of 4 input channels.

    Groups run along dim 1 (input channels) for every output channel and kernel tap (k, r, s) of a
    Conv2d weight (O, I, kh, kw), and along ``in_features`` for a Linear weight (O, I) -- the layout
    TensorRT's sparse kernels require. Ties are broken by position (lower index wins).

    Example:
        >>> compute_2to4_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]])).tolist()
        [[False, True, True, False]]
    """
    if weight.dim() not in (2, 4):
        raise ValueError(f"expected a Linear (2-D) or Conv2d (4-D) weight, got shape {tuple(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(f"input channels ({weight.shape[1]}) must be a multiple of 4 for 2:4 sparsity")
    w = _to_groups_layout(weight.detach().abs().float())
    groups = w.reshape(-1, 4)
    # A stable descending sort (not topk) so that ties go to the lower index on every device: ranks
    # and resumed runs then agree on the mask bit for bit.
    keep = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return _from_groups_layout(mask.reshape(w.shape), weight).contiguous()


def is_2to4(weight: torch.Tensor) -> bool:
    """True when every group of 4 input-channel weights holds at least 2 zeros.

    Example:
        >>> is_2to4(torch.tensor([[0.0, 1.0, 0.0, 2.0]])), is_2to4(torch.ones(1, 4))
        (True, False)
    """
    return worst_group_nonzeros(weight) <= 2


def worst_group_nonzeros(weight: torch.Tensor) -> int:
    """Largest count of nonzeros in any group of 4 input-channel weights (4 when channels don't divide)."""
    return worst_group(weight)[0]


def worst_group(weight: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """The largest count of nonzeros in a group of 4 input-channel weights, and where that group starts.

    The index is into ``weight`` itself (``(o, i, kh, kw)`` for a Conv2d, ``(o, i)`` for a Linear), ``i``
    being the group's first input channel. When the input channels don't divide by 4 the count is 4 and
    the index is ``()``.

    Example:
        >>> worst_group(torch.tensor([[1.0, 0.0, 0.0, 2.0, 1.0, 1.0, 1.0, 0.0]]))
        (3, (0, 4))
    """
    if weight.dim() not in (2, 4) or weight.shape[1] % 4:
        return 4, ()
    w = _to_groups_layout(weight.detach())
    nz = (w != 0).reshape(-1, 4).sum(1)
    if not nz.numel():
        return 0, ()
    flat = int(nz.argmax())
    idx = list(torch.unravel_index(torch.tensor(flat * 4), w.shape))
    if weight.dim() == 4:  # (o, kh, kw, i) -> (o, i, kh, kw)
        idx = [idx[0], idx[3], idx[1], idx[2]]
    return int(nz[flat]), tuple(int(i) for i in idx)


@torch.no_grad()
def apply_masks(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Zero the pruned weights in place, in one fused call (no ``weight * mask`` copies)."""
    if weights:
        torch._foreach_mul_(weights, masks)
