"""How much weight magnitude 2:4 pruning keeps: sum of |w| kept / sum of |w|, per layer and overall."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class KeptMagnitude:
    """Magnitude a 2:4 mask keeps (``kept``) out of the layer's total (``total``), both sums of ``|w|``.

    Example:
        >>> KeptMagnitude(3.0, 4.0).share
        0.75
    """

    kept: float
    total: float

    @property
    def share(self) -> float:
        return self.kept / self.total if self.total > 0 else 1.0


def weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as ``(rows, input channels)``: a Conv2d ``(O, I, kh, kw)`` becomes ``(O*kh*kw, I)``.

    Each row then holds the weights that 2:4 groups in fours (for one output channel and kernel tap).

    Example:
        >>> weight_rows(torch.zeros(8, 16, 3, 3)).shape
        torch.Size([72, 16])
    """
    w = weight.detach()
    return w.permute(0, 2, 3, 1).reshape(-1, w.shape[1]) if w.dim() == 4 else w.reshape(w.shape[0], -1)


@torch.no_grad()
def kept_by_2to4(weight: torch.Tensor) -> KeptMagnitude:
    """Magnitude that magnitude 2:4 pruning of ``weight`` (groups of 4 input channels) would keep.

    Example:
        >>> kept_by_2to4(torch.tensor([[1.0, 4.0, 2.0, 3.0]]))
        KeptMagnitude(kept=7.0, total=10.0)
    """
    from qatsparse.sparsity.permutation.search import kept_sum

    rows = weight_rows(weight).abs().float()
    return KeptMagnitude(kept_sum(rows), float(rows.sum(dtype=torch.float64)))


def kept_magnitude(model: nn.Module, layers: Iterable[str]) -> dict[str, KeptMagnitude]:
    """:func:`kept_by_2to4` of the weight of each named layer (Conv2d/Linear, input channels a multiple of 4).

    Example:
        >>> m = nn.Sequential(nn.Linear(16, 8)); round(kept_magnitude(m, ["0"])["0"].share, 1) > 0.5
        True
    """
    modules = dict(model.named_modules())
    return {name: kept_by_2to4(modules[name].weight) for name in layers}


def overall(kept: Mapping[str, KeptMagnitude]) -> KeptMagnitude:
    """All layers together (sum of kept over sum of total).

    Example:
        >>> overall({"a": KeptMagnitude(1.0, 2.0), "b": KeptMagnitude(3.0, 4.0)}).share
        0.6666666666666666
    """
    return KeptMagnitude(sum(k.kept for k in kept.values()), sum(k.total for k in kept.values()))
