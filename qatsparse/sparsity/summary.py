"""What pruning did, for people (a one-screen summary) and for loggers (per-layer and overall sparsity)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from qatsparse.sparsity.magnitude import KeptMagnitude
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
    zeros, sizes = weight_zero_counts(model)
    return metrics_from_counts(zeros, sizes, pruned, prefix)


def sparsity_metrics_over_ranks(trainer: Any, model: nn.Module, pruned: list[str]) -> dict[str, float]:
    """:func:`sparsity_metrics` without gathering weights: under FSDP each rank counts the zeros of its own shards
    and the counts are summed over the ranks (identical on every rank, which must all call it); without FSDP
    the counts of the whole weights.

    Example:
        >>> from qatsparse.sparsity import prune_2to4
        >>> m = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 3)); ms = prune_2to4(m)
        >>> sparsity_metrics_over_ranks(None, m, list(ms.masks)) == sparsity_metrics(m, list(ms.masks))
        True
    """
    from qatsparse.sharding import summed_over_ranks

    zeros, sizes = weight_zero_counts(model)
    summed = summed_over_ranks(trainer, {k: [zeros[k], sizes[k]] for k in sizes})
    return metrics_from_counts({k: z for k, (z, _) in summed.items()}, {k: n for k, (_, n) in summed.items()}, pruned)


@torch.no_grad()
def weight_zero_counts(model: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """Zeros and elements of every prunable weight by key: of the whole weight, or of this rank's shard under FSDP
    (``model`` as FSDP wraps it: keys are given without the wrapper segments, and the counts of all ranks add up
    to the full weights').

    Example:
        >>> m = nn.Linear(4, 2); _ = m.weight.data.zero_()
        >>> weight_zero_counts(m)
        ({'': 8}, {'': 8})
    """
    from qatsparse.sharding import clean_name

    modules = {clean_name(k): m for k, m in prunable_weights(model).items()}
    zeros = {n: int((m.weight == 0).sum()) for n, m in modules.items()}
    sizes = {n: m.weight.numel() for n, m in modules.items()}
    return zeros, sizes


def metrics_from_counts(
    zeros: dict[str, int], sizes: dict[str, int], pruned: list[str], prefix: str = "qatsparse/sparsity/"
) -> dict[str, float]:
    """:func:`sparsity_metrics` from the zero and element counts of every prunable weight.

    Example:
        >>> metrics_from_counts({"a": 2, "b": 0}, {"a": 4, "b": 4}, ["a"], prefix="")["pruned_weight_share"]
        0.25
    """
    total = max(sum(sizes.values()), 1)
    done = [n for n in pruned if n in sizes]
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


def kept_report(
    plain: dict[str, KeptMagnitude], permuted: dict[str, KeptMagnitude]
) -> dict[str, dict[str, float | None]]:
    """Per layer: share of ``|w|`` kept by plain 2:4 and after the permutation (None when not permuted).

    Example:
        >>> kept_report({"fc": KeptMagnitude(6.0, 10.0)}, {"fc": KeptMagnitude(7.0, 10.0)})["fc"]
        {'plain': 0.6, 'permuted': 0.7, 'total': 10.0}
    """
    return {
        name: {
            "plain": k.share,
            "permuted": permuted[name].share if name in permuted else None,
            "total": k.total,
        }
        for name, k in plain.items()
    }


def overall_kept(kept: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """All pruned layers together (weighted by each layer's sum of ``|w|``).

    Example:
        >>> a, b = {"plain": 0.5, "permuted": 0.6, "total": 1.0}, {"plain": 0.75, "permuted": None, "total": 3.0}
        >>> overall_kept({"a": a, "b": b})
        {'plain': 0.6875, 'permuted': None}
    """
    total = sum(float(v["total"] or 0.0) for v in kept.values())
    if total <= 0:
        return {"plain": None, "permuted": None}
    plain = sum(float(v["plain"] or 0.0) * float(v["total"] or 0.0) for v in kept.values()) / total
    if any(v["permuted"] is None for v in kept.values()):
        return {"plain": plain, "permuted": None}
    perm = sum(float(v["permuted"]) * float(v["total"] or 0.0) for v in kept.values()) / total  # type: ignore[arg-type]
    return {"plain": plain, "permuted": perm}


def format_kept_magnitude(kept: dict[str, dict[str, float | None]], permutation: dict | None) -> str:
    """Lines for the summary: magnitude kept overall and for the layers with the most weight, the
    permutation's groups and time, and the layers it left alone grouped by reason.

    Example:
        >>> print(format_kept_magnitude({"fc": {"plain": 0.6, "permuted": None, "total": 10.0}}, None))
          magnitude kept by 2:4 (sum |w| kept / sum |w|): 60.00% (no channel permutation)
    """
    o = overall_kept(kept)
    if o["permuted"] is None:
        return f"  magnitude kept by 2:4 (sum |w| kept / sum |w|): {o['plain']:.2%} (no channel permutation)"
    lines = [
        f"  magnitude kept by 2:4 (sum |w| kept / sum |w|): {o['permuted']:.2%} with channel permutation, "
        f"{o['plain']:.2%} without (+{(o['permuted'] - o['plain']) * 100:.2f} points)"  # type: ignore[operator]
    ]
    biggest = sorted(kept, key=lambda n: -float(kept[n]["total"] or 0.0))
    for name in biggest[:_MAX_NAMES]:
        v = kept[name]
        lines.append(f"    {name}: {v['permuted']:.2%} (plain {v['plain']:.2%})")
    if len(biggest) > _MAX_NAMES:
        lines.append(f"    ... {len(biggest) - _MAX_NAMES} more layers (TwoFourSparsity.kept, report.json 'sparsity')")
    p = permutation or {}
    if p.get("skipped"):
        lines.append(f"  channel permutation not applied: {p['skipped']}")
    elif p:
        lines.append(
            f"  channel permutation: {p.get('groups_moved', 0)} of {p.get('groups_searched', 0)} channel groups "
            f"reordered, search {p.get('search_seconds', 0.0):.1f} s"
        )
    by_reason: dict[str, list[str]] = defaultdict(list)
    for name, why in (p.get("not_permuted") or {}).items():
        by_reason[re.sub(r"'[^']*'", "'…'", why)].append(name)
    if by_reason:
        lines.append(f"  not permuted ({sum(map(len, by_reason.values()))} layers):")
    for why, names in list(by_reason.items())[:_MAX_REASONS]:
        lines.append(f"    {why}: {_names(names)}")
    if len(by_reason) > _MAX_REASONS:
        lines.append(f"    ... {len(by_reason) - _MAX_REASONS} more reasons (TwoFourSparsity.permutation)")
    return "\n".join(lines)
