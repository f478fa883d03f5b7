"""Check that a permuted model still computes what it computed before (run on a few example inputs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qatsparse.sparsity.permutation.channel_ops import flatten_args
from qatsparse.sparsity.permutation.graph import _eval_no_side_effects


def example_slice(inputs: Sequence[Any], n: int = 2) -> tuple[Any, ...]:
    """The first ``n`` samples of each batched tensor input (a single sample is repeated: the graph
    analysis needs a batch dimension it can tell apart from the channels).

    Example:
        >>> [t.shape[0] for t in example_slice((torch.zeros(8, 3), torch.zeros(1, 5)))]
        [2, 2]
    """
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            t = t[:n]
            if t.shape[0] < n:
                t = torch.cat([t] * n)[:n]
        out.append(t)
    return tuple(out)


def model_outputs(model: nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """Every tensor ``model(*inputs)`` returns, computed in eval mode without touching BatchNorm
    statistics or the random number generators."""
    device = next((p.device for p in model.parameters()), None)
    with _eval_no_side_effects(model, device):
        out = model(*inputs)
    return [
        t.detach().float().clone()
        for t in flatten_args(out if isinstance(out, (list, tuple, dict)) else [out])
        if isinstance(t, torch.Tensor)
    ]


def max_difference(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(largest absolute difference, largest absolute value of ``before``) over all outputs.

    Example:
        >>> max_difference([torch.tensor([1.0, -2.0])], [torch.tensor([1.0, -2.5])])
        (0.5, 2.0)
    """
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
        return float("inf"), 0.0
    diff = max((float((a - b).abs().max()) for a, b in zip(before, after) if a.numel()), default=0.0)
    scale = max((float(a.abs().max()) for a in before if a.numel()), default=0.0)
    return diff, scale
