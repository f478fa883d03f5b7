"""Which layers TensorRT can run with sparse kernels, and which the user wants pruned."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qatsparse.patterns import compile_patterns, matches_any, require_matches
from qatsparse.sparsity.masks import PRUNABLE_TYPES


@dataclass
class Eligibility:
    """Result of :func:`find_prunable`: layers to prune and skipped layers with the reason.

    Example:
        >>> e = find_prunable(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 3)))
        >>> list(e.eligible), e.skipped["1"]
        (['0'], 'C_out=3 not a multiple of 8, C_in=8 not a multiple of 16')
    """

    eligible: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def shape_reason(module: nn.Module) -> str | None:
    """Why a Conv2d/Linear cannot run on sparse kernels, or None when it can.

    TensorRT groups weights by 4 along input channels; grouped and depthwise convs are not
    considered, and ModelOpt/TensorRT sparse kernels need C_out % 8 == 0 and C_in % 16 == 0.
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            if module.groups == module.in_channels:
                return "depthwise conv: not supported by sparse kernels"
            return f"grouped conv (groups={module.groups}): not supported by sparse kernels"
        c_out, c_in = module.out_channels, module.in_channels
    elif isinstance(module, nn.Linear):
        c_out, c_in = module.out_features, module.in_features
    else:
        return f"{type(module).__name__} is not a Conv2d or Linear"
    problems = []
    if c_out % 8:
        problems.append(f"C_out={c_out} not a multiple of 8")
    if c_in % 16:
        problems.append(f"C_in={c_in} not a multiple of 16")
    return ", ".join(problems) or None


def find_prunable(
    model: nn.Module, include: list[str] | str | None = None, exclude: list[str] | str | None = None
) -> Eligibility:
    """Split the model's Conv2d/Linear layers into eligible and skipped (with reasons).

    Args:
        model: the model.
        include: patterns of module names to consider (regexes searched in the name, or globs; see
            :mod:`qatsparse.patterns`); when given, only matching layers are considered.
        exclude: patterns of module names never pruned.

    Raises:
        ValueError: an ``include`` or ``exclude`` pattern matches no Conv2d/Linear layer, or a pattern is
            neither a valid regex nor a glob.
    """
    inc, exc = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    require_matches(inc, layers, "include", "Conv2d/Linear layer")
    require_matches(exc, layers, "exclude", "Conv2d/Linear layer")
    result = Eligibility()
    for name, m in layers.items():
        if inc and not matches_any(inc, name):
            result.skipped[name] = "not matched by include"
        elif matches_any(exc, name):
            result.skipped[name] = "excluded by user"
        elif (reason := shape_reason(m)) is not None:
            result.skipped[name] = reason
        else:
            result.eligible[name] = m
    return result
