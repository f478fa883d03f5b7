"""Magnitude 2:4 pruning of a model and the masks that keep it pruned."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from qatsparse.sparsity.eligibility import find_prunable
from qatsparse.sparsity.masks import apply_masks, compute_2to4_mask
from qatsparse.sparsity.weights import prunable_weights


@dataclass
class MaskSet:
    """The 2:4 masks of a model, keyed by weight key, and the weights or layers skipped with reasons.

    A key is the module name for a layer's ``weight`` (``"layer1.0.conv1"``) and ``module.parameter`` for
    other weights (``"encoder.0.self_attn.in_proj_weight"``), see :mod:`~qatsparse.sparsity.weights`;
    masks saved by earlier versions (keyed by module name) load unchanged.

    Masks are kept as bool tensors; :meth:`apply` zeroes the pruned weights in place with one fused
    ``_foreach_mul_`` (after every optimizer step the callback calls it). Hand-written because
    PyTorch's ``torch.nn.utils.prune`` re-materialises ``weight_orig * mask`` on every forward and
    changes the parameter names, which breaks optimizers, checkpoints and export.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 8))
        >>> masks = prune_2to4(model); masks.apply(model); list(masks.masks)
        ['0']
    """

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def bind(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The pruned weight parameters of ``model`` and their masks (moved to the weights' device and
        dtype), as two lists for :func:`~qatsparse.sparsity.apply_masks`.

        The parameters themselves are returned (not ``.data``), so a later change of memory format
        keeps the binding valid; rebind after the model moves to another device or dtype.

        Raises:
            KeyError: a masked weight is not in ``model``.
            ValueError: a mask's shape differs from its weight.
        """
        found = prunable_weights(model)
        weights, masks = [], []
        for name, mask in self.masks.items():
            if name not in found:
                raise KeyError(f"pruned weight {name!r} is not in the model (or is not a prunable weight)")
            w = found[name].weight
            if mask.shape != w.shape:
                raise ValueError(f"mask of {name!r} has shape {tuple(mask.shape)}, its weight {tuple(w.shape)}")
            if mask.device != w.device or mask.dtype != w.dtype or mask.stride() != w.stride():
                # The weight's strides too (channels_last conv weights): torch._foreach_mul_ takes its fused
                # multi-tensor kernel only when every pair has the same strides, else one strided kernel per
                # weight after every optimizer step.
                mask = self.masks[name] = torch.empty_like(w).copy_(mask)
            weights.append(w)
            masks.append(mask)
        return weights, masks

    def apply(self, model: nn.Module) -> None:
        """Zero every pruned weight of ``model`` in place."""
        apply_masks(*self.bind(model))

    def state_dict(self) -> dict:
        return {"masks": {k: v.detach().bool().cpu() for k, v in self.masks.items()}, "skipped": dict(self.skipped)}

    @classmethod
    def from_state_dict(cls, state: dict) -> MaskSet:
        return cls(masks={k: v.bool() for k, v in state["masks"].items()}, skipped=dict(state["skipped"]))


@torch.no_grad()
def compute_masks(
    model: nn.Module,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
) -> MaskSet:
    """Magnitude 2:4 masks of every eligible layer, without touching the model.

    Example:
        >>> m = nn.Linear(16, 8); ms = compute_masks(m); float(ms.masks[""].float().mean()), bool((m.weight != 0).all())
        (0.5, True)
    """
    inc = list(include) if include is not None and not isinstance(include, str) else include
    exc = list(exclude) if exclude is not None and not isinstance(exclude, str) else exclude
    elig = find_prunable(model, inc, exc)
    masks = {name: compute_2to4_mask(w.weight, w.in_axis) for name, w in elig.eligible.items()}
    return MaskSet(masks=masks, skipped=elig.skipped)


@torch.no_grad()
def prune_2to4(
    model: nn.Module,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
) -> MaskSet:
    """Compute magnitude 2:4 masks for every eligible layer and zero the pruned weights.

    Works with any memory format (the mask is computed on the logical weight layout) and leaves the
    parameters' identity unchanged, so optimizers and their state stay valid.

    Example:
        >>> m = nn.Linear(16, 8); masks = prune_2to4(m); float((m.weight == 0).float().mean())
        0.5
    """
    masks = compute_masks(model, include, exclude)
    masks.apply(model)
    return masks
