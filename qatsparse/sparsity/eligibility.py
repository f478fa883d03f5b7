"""Which weights TensorRT can run with sparse kernels, and which the user wants pruned."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
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


_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _own_forward(module: nn.Module) -> bool:
    """A subclass of Linear/Conv1d/Conv2d whose ``forward`` (or ``_conv_forward``) is not the base class's."""
    t = type(module)
    base = next((b for b in _LAYERS if isinstance(module, b)), None)
    if base is None or t is base:
        return False
    return any(
        getattr(t, a, None) is not getattr(base, a, None) for a in ("forward", "_conv_forward") if hasattr(base, a)
    )


@torch.no_grad()
def transform_reason(weight: PrunableWeight) -> str | None:
    """Why a layer's zeros would not reach the graph: its own ``forward`` computes with a transform of the weight
    (timm's ``StdConv2d``/``ScaledStdConv2d`` standardise it), found as an output that is not linear in the
    weight: ``f(2W) - f(W) != f(W) - f(0)``. None for a layer that computes with the weight as it is, for the
    base classes, and when the forward cannot be tried on a made-up input.

    Example:
        >>> class Std(nn.Conv2d):
        ...     def forward(self, x):
        ...         w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std() + 1e-5)
        ...         return self._conv_forward(x, w, self.bias)
        >>> w = prunable_weights(Std(16, 8, 3))[""]
        >>> transform_reason(w)[:40], transform_reason(prunable_weights(nn.Conv2d(16, 8, 3))[""])
        ('Std computes with a transform of its wei', None)
    """
    m = weight.module
    if weight.param != "weight" or not _own_forward(m):
        return None
    g = torch.Generator().manual_seed(0)  # a generator of its own: the training run's random numbers are not touched
    try:
        m = copy.deepcopy(m).eval()
        # A made-up weight: the layer's own may make the output constant (NF-Nets start a block's last conv
        # with gain 0), which would hide the transform.
        w = torch.randn(m.weight.shape, generator=g).to(m.weight.device, m.weight.dtype)
        if isinstance(m, nn.Linear):
            shape = [2, m.in_features]
        else:
            shape = [
                1,
                m.in_channels,
                *(max(16, d * (k - 1) + 1 + s) for k, d, s in zip(m.kernel_size, m.dilation, m.stride)),
            ]
        x = torch.randn(shape, generator=g).to(w.device, w.dtype)
        ys = []
        for scale in (0.0, 1.0, 2.0):
            m.weight.copy_(w * scale)
            ys.append(m(x).float())
    except Exception:  # a forward that needs more than a plain input: nothing can be said
        return None
    step, step2 = ys[1] - ys[0], ys[2] - ys[1]
    size = float(step.abs().max().nan_to_num(0.0))
    if size > 0 and bool(torch.isfinite(step2).all()) and float((step2 - step).abs().max()) <= 1e-3 * size:
        return None
    return (
        f"{type(weight.module).__name__} computes with a transform of its weight in forward (e.g. weight "
        "standardization), so the weight's zeros would not reach the graph"
    )


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
        elif (reason := shape_reason(w) or transform_reason(w)) is not None:
            result.skipped[name] = reason
        else:
            result.eligible[name] = w
    for name, why in not_compressed(model, "sparsity").items():
        result.skipped.setdefault(name, why)
    return result
