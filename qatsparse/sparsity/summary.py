"""What pruning did, for people (a one-screen summary) and for loggers (per-layer and overall sparsity)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from qatsparse.sparsity.prune import MaskSet
from qatsparse.sparsity.weights import prunable_weights

_MAX_REASONS = 12
_MAX_NAMES = 8


@torch.no_grad()
def sparsity_metrics(model: nn.Module, pruned: list[str], prefix: str = "qatsparse/sparsity/") -> dict[str, float]:
    """What pruning did, for loggers, each named for what it is (all prunable weights, see
    :mod:`~qatsparse.sparsity.weights`):

    * ``pruned_layers``: the number of pruned weights;
    * ``pruned_weight_share``: the zeros inside pruned weights as a share of all weights (what pruning removed);
    * ``zero_share``: all zeros as a share of all weights;
    * ``pruned_layer_zero_share``: the zero share inside the pruned weights (0.5 for 2:4);
    * ``layer_zero_share/<key>``: the zero share of each pruned weight.

    Example:
        >>> from qatsparse.sparsity import prune_2to4
        >>> m = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 3)); ms = prune_2to4(m)
        >>> sparsity_metrics(m, list(ms.masks))["qatsparse/sparsity/layer_zero_share/0"]
        0.5
    """
    modules = prunable_weights(model)
    zeros = {n: int((m.weight == 0).sum()) for n, m in modules.items()}
    sizes = {n: m.weight.numel() for n, m in modules.items()}
    total = max(sum(sizes.values()), 1)
    done = [n for n in pruned if n in modules]
    p_zero = sum(zeros[n] for n in done)
    out = {
        f"{prefix}pruned_layers": float(len(done)),
        f"{prefix}pruned_weight_share": p_zero / total,
        f"{prefix}zero_share": sum(zeros.values()) / total,
        f"{prefix}pruned_layer_zero_share": p_zero / max(sum(sizes[n] for n in done), 1),
    }
    out.update({f"{prefix}layer_zero_share/{n}": zeros[n] / sizes[n] for n in done})
    return out


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f", ... (+{len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else "")


def _family(w) -> str:
    from qatsparse.sparsity.weights import is_hf_conv1d

    if isinstance(w.module, nn.MultiheadAttention):
        return "attention"
    if is_hf_conv1d(w.module):
        return "Conv1D"
    families = (nn.Conv1d, nn.Conv2d, nn.Linear)
    return next((t.__name__ for t in families if isinstance(w.module, t)), type(w.module).__name__)


def _kinds(weights: dict) -> str:
    kinds = sorted({_family(w) for w in weights.values()})
    return "/".join(kinds) if kinds else "Conv2d/Linear"


def format_summary(masks: MaskSet, model: nn.Module) -> str:
    """One screen: pruned weights, skipped weights and layers grouped by reason, and the share of weights pruned.

    Example:
        >>> from qatsparse.sparsity import prune_2to4
        >>> m = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 3)); ms = prune_2to4(m)
        >>> print(format_summary(ms, m).splitlines()[0])
        2:4 sparsity: pruned 1 of 2 Linear weights (128 of 152 weights, 84.2%)
    """
    modules = prunable_weights(model)
    total = sum(m.weight.numel() for m in modules.values())
    pruned = [n for n in masks.masks if n in modules]
    n_pruned = sum(modules[n].weight.numel() for n in pruned)
    zeros = sum(int((m.weight == 0).sum()) for m in modules.values())
    lines = [
        f"2:4 sparsity: pruned {len(pruned)} of {len(modules)} {_kinds(modules)} weights "
        f"({n_pruned:,} of {total:,} weights, {n_pruned / max(total, 1):.1%})",
        f"  zeros: {zeros / max(total, 1):.1%} of all prunable weights",
        f"  pruned: {_names(pruned)}" if pruned else "  pruned: none",
    ]
    by_reason: dict[str, list[str]] = defaultdict(list)
    for name, why in masks.skipped.items():
        by_reason[why].append(name)
    if by_reason:
        lines.append(f"  skipped {len(masks.skipped)} weights/layers:")
    for why, names in list(by_reason.items())[:_MAX_REASONS]:
        lines.append(f"    {why}: {_names(names)}")
    if len(by_reason) > _MAX_REASONS:
        lines.append(f"    ... {len(by_reason) - _MAX_REASONS} more reasons (see TwoFourSparsity.masks.skipped)")
    return "\n".join(lines)
