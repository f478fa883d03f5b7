"""Which weights TensorRT can run with sparse kernels, and which the user wants pruned."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qatsparse.patterns import compile_patterns, matches_any, require_matches
from qatsparse.sparsity.weights import PrunableWeight, prunable_weights


@dataclass
class Eligibility:
    """Result of :func:`find_prunable`: weights to prune (by key) and skipped weights or layers with the reason.

    ``eligible`` maps each key to its :class:`~qatsparse.sparsity.weights.PrunableWeight` (``.weight`` is
    the tensor); ``skipped`` also names the layers no 2:4 kernel exists for (LSTM, embeddings, ...).

    Example:
        >>> e = find_prunable(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 3)))
        >>> list(e.eligible), e.skipped["1"]
        (['0'], 'C_out=3 not a multiple of 8, C_in=8 not a multiple of 16')
    """

    eligible: dict[str, PrunableWeight] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def shape_reason(weight: PrunableWeight | nn.Module) -> str | None:
    """Why a weight cannot run on sparse kernels, or None when it can.

    TensorRT groups weights by 4 along input channels; grouped and depthwise convs are not considered,
    and ModelOpt/TensorRT sparse kernels need C_out % 8 == 0 and C_in % 16 == 0. A module is read as
    its ``weight`` (a Conv1d/Conv2d/Linear/transformers ``Conv1D``).

    Example:
        >>> shape_reason(nn.Linear(16, 8)) is None, shape_reason(nn.Conv2d(8, 8, 3, groups=8))
        (True, 'depthwise conv: not supported by sparse kernels')
    """
    if isinstance(weight, nn.Module):
        found = prunable_weights(weight).get("")
        if found is None:
            return f"{type(weight).__name__} has no weight 2:4 sparsity can prune"
        weight = found
    if weight.groups != 1:
        m = weight.module
        if weight.groups == getattr(m, "in_channels", None):
            return "depthwise conv: not supported by sparse kernels"
        return f"grouped conv (groups={weight.groups}): not supported by sparse kernels"
    problems = []
    if weight.c_out % 8:
        problems.append(f"C_out={weight.c_out} not a multiple of 8")
    if weight.c_in % 16:
        problems.append(f"C_in={weight.c_in} not a multiple of 16")
    return ", ".join(problems) or None


def find_prunable(
    model: nn.Module, include: list[str] | str | None = None, exclude: list[str] | str | None = None
) -> Eligibility:
    """Split the model's prunable weights into eligible and skipped (with reasons).

    Candidates are the weights of Conv1d/Conv2d/Linear (subclasses included), transformers ``Conv1D``
    and ``nn.MultiheadAttention`` input projections (see :mod:`~qatsparse.sparsity.weights`), named by
    their key (the module name, or ``module.parameter``). Layers no sparse kernel exists for (LSTM,
    embeddings, deconvolutions, ...) are listed in ``skipped`` with their reason
    (:func:`qatsparse.inventory.not_compressed`).

    Args:
        model: the model.
        include: patterns of keys to consider (regexes searched in the key, or globs; see
            :mod:`qatsparse.patterns`); when given, only matching weights are considered.
        exclude: patterns of keys never pruned (``"attn"`` excludes every weight of a module named attn).

    Raises:
        ValueError: an ``include`` or ``exclude`` pattern matches no candidate, or a pattern is neither a valid
            regex nor a glob.
    """
    from qatsparse.inventory import not_compressed

    inc, exc = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    weights = prunable_weights(model)
    require_matches(inc, weights, "include", "prunable weight")
    require_matches(exc, weights, "exclude", "prunable weight")
    result = Eligibility()
    for name, w in weights.items():
        if inc and not matches_any(inc, name):
            result.skipped[name] = "not matched by include"
        elif matches_any(exc, name):
            result.skipped[name] = "excluded by user"
        elif (reason := shape_reason(w)) is not None:
            result.skipped[name] = reason
        else:
            result.eligible[name] = w
    for name, why in not_compressed(model, "sparsity").items():
        result.skipped.setdefault(name, why)
    return result
