"""How much weight magnitude 2:4 pruning keeps: sum of |w| kept / sum of |w|, per layer and overall."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qatsparse.sparsity.weights import prunable_weights


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


def weight_rows(weight: torch.Tensor, in_axis: int = 1) -> torch.Tensor:
    """The weight as ``(rows, input channels)``, the input axis last: a Conv2d ``(O, I, kh, kw)`` becomes
    ``(O*kh*kw, I)``, a transformers ``Conv1D`` ``(I, O)`` (``in_axis=0``) becomes ``(O, I)``.

    Each row then holds the weights that 2:4 groups in fours (for one output channel and kernel tap).

    Example:
        >>> weight_rows(torch.zeros(8, 16, 3, 3)).shape
        torch.Size([72, 16])
    """
    w = weight.detach().movedim(in_axis, -1)
    return w.reshape(-1, w.shape[-1])


@torch.no_grad()
def kept_by_2to4(weight: torch.Tensor, in_axis: int = 1) -> KeptMagnitude:
    """Magnitude that magnitude 2:4 pruning of ``weight`` (groups of 4 along ``in_axis``) would keep.

    Example:
        >>> kept_by_2to4(torch.tensor([[1.0, 4.0, 2.0, 3.0]]))
        KeptMagnitude(kept=7.0, total=10.0)
    """
    from qatsparse.sparsity.permutation.search import kept_sum

    rows = weight_rows(weight, in_axis).abs().float()
    return KeptMagnitude(kept_sum(rows), float(rows.sum(dtype=torch.float64)))


def kept_magnitude(model: nn.Module, keys: Iterable[str]) -> dict[str, KeptMagnitude]:
    """:func:`kept_by_2to4` of each prunable weight named by its key (see :mod:`qatsparse.sparsity.weights`).

    Example:
        >>> m = nn.Sequential(nn.Linear(16, 8)); round(kept_magnitude(m, ["0"])["0"].share, 1) > 0.5
        True
    """
    weights = prunable_weights(model)
    return {key: kept_by_2to4(weights[key].weight, weights[key].in_axis) for key in keys}


def overall(kept: Mapping[str, KeptMagnitude]) -> KeptMagnitude:
    """All layers together (sum of kept over sum of total).

    Example:
        >>> overall({"a": KeptMagnitude(1.0, 2.0), "b": KeptMagnitude(3.0, 4.0)}).share
        0.6666666666666666
    """
    return KeptMagnitude(sum(k.kept for k in kept.values()), sum(k.total for k in kept.values()))
