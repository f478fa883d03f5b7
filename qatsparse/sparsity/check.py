"""Verify 2:4 sparsity of a PyTorch module or of an exported ONNX graph."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from torch import nn

from qatsparse.sparsity.masks import worst_group, worst_group_nonzeros
from qatsparse.sparsity.record import pruned_record
from qatsparse.sparsity.weights import prunable_weights

#: ONNX metadata key under which the export records the pruned weights ({weight key: [node names]}).
PRUNED_METADATA_KEY = "qatsparse.pruned_layers"


@dataclass(frozen=True)
class Violation:
    """A layer that is not 2:4 along its input channels.

    Attributes:
        layer: module name (PyTorch) or node name (ONNX).
        worst_group: the largest count of nonzeros found in one group of 4 (3 or 4), or -1 when the
            layer was expected but not found (or its weight could not be traced to a constant).
        detail: a human-readable explanation.
        index: where the worst group starts in the weight tensor (its first element, in the weight's
            own layout: ``(o, i, kh, kw)`` for a Conv); ``()`` when there is no such group.

    Example:
        >>> Violation("fc", 4, "4 nonzeros in a group of 4").layer
        'fc'
    """

    layer: str
    worst_group: int
    detail: str
    index: tuple[int, ...] = ()


def check_2to4(x: nn.Module | str | Path, layers: Literal["pruned", "all"] | list[str] = "pruned") -> list[Violation]:
    """Return the layers that violate 2:4 sparsity; ``[]`` means every checked layer is 2:4.

    Args:
        x: an ``nn.Module`` or the path of an ONNX file.
        layers: ``"pruned"`` (default) checks the layers recorded as pruned -- for an ONNX file the
            export's metadata, for a module the layers a :class:`~qatsparse.TwoFourSparsity` callback
            pruned (recorded on the module as ``_qatsparse_pruned``); ``"all"`` checks every weighted
            Conv/Gemm/MatMul (ONNX) or every prunable weight (module: Conv1d/Conv2d/Linear, attention
            projections, transformers ``Conv1D``); a list names the layers to check (weight keys, see
            :mod:`~qatsparse.sparsity.weights`, or ONNX node names).

    ONNX weights are traced back through DequantizeLinear/QuantizeLinear/Cast/Identity/Transpose to a
    constant (:mod:`qatsparse.export.graph`) and checked in groups of 4 along the reduction axis: Conv
    ``W`` axis 1, Gemm ``B`` axis 1 when ``transB=1`` else 0, MatMul ``B`` axis -2 (0 for a 2-D ``B``),
    ConvTranspose ``W`` axis 0.

    Raises:
        ValueError: ``layers="pruned"`` but nothing is recorded (no TwoFourSparsity record on the
            module, no ``qatsparse.pruned_layers`` metadata in the ONNX file).
        FileNotFoundError: no ONNX file at the path.

    Example:
        >>> lin = nn.Linear(8, 2); check_2to4(lin, layers="all")[0].worst_group
        4
    """
    if isinstance(x, nn.Module):
        return _check_module(x, layers)
    return _check_onnx(Path(x), layers)


def _check_module(model: nn.Module, layers: Literal["pruned", "all"] | list[str]) -> list[Violation]:
    modules = prunable_weights(model)
    if layers == "all":
        names = list(modules)
    elif layers == "pruned":
        recorded = pruned_record(model)
        if recorded is None:
            raise ValueError(
                "check_2to4(module): no pruned layers are recorded on this module (TwoFourSparsity records "
                "them; load_from_checkpoint restores them through qatsparse.restore_structure); "
                "pass layers='all' or a list of layer names"
            )
        names = recorded
    elif isinstance(layers, str):
        raise ValueError(f"layers must be 'pruned', 'all' or a list of layer names, got {layers!r}")
    else:
        names = list(layers)
    out = []
    for name in names:
        if name not in modules:
            out.append(Violation(name, -1, "layer not found in the model"))
            continue
        pw = modules[name]
        worst, index = worst_group(pw.weight, pw.in_axis)
        if worst > 2:
            what = (
                f"{worst} nonzeros in the group of 4 input channels at {index}"
                if index
                else f"input channels ({pw.c_in}) not a multiple of 4"
            )
            out.append(Violation(name, worst, what, index))
    return out


# ---------------------------------------------------------------- ONNX
def _onnx_weight(graph, tensor_name: str, axis: int) -> tuple[np.ndarray, int] | None:
    """The constant behind ``tensor_name`` (see :mod:`qatsparse.export.graph`) and ``axis`` mapped onto it."""
    trace = graph.trace_constant(tensor_name)
    if trace is None or trace.array.ndim == 0:
        return None
    return trace.array, trace.axis_on_constant(axis)


def _worst_along(w: np.ndarray, axis: int) -> tuple[int, tuple[int, ...]]:
    """Most nonzeros in a group of 4 consecutive elements along ``axis``, and where that group starts."""
    if w.shape[axis] % 4:
        return 4, ()
    moved = np.moveaxis(w != 0, axis, -1)
    nz = moved.reshape(-1, 4).sum(1)
    if not nz.size:
        return 0, ()
    flat = int(nz.argmax())
    idx = list(np.unravel_index(flat * 4, moved.shape))
    idx.insert(axis, idx.pop())  # back to w's own layout
    return int(nz[flat]), tuple(int(i) for i in idx)


def _weighted_nodes(graph) -> dict[str, tuple[str, int]]:
    """node name -> (weight input name, reduction axis on that input) for Conv/ConvTranspose/Gemm/MatMul."""
    from qatsparse.export.graph import weight_uses

    return {n: (u.input, u.in_axis) for n, u in weight_uses(graph).items()}


def pruned_layers_from_metadata(path: str | Path) -> dict[str, list[str]]:
    """The ``{weight key: [ONNX node names]}`` map that the export stored, or {} when absent.

    A weight maps to several nodes when the graph uses it in parts (e.g. the query and key/value rows of an
    attention's packed input projection in cross-attention). Files written before weights could map to
    several nodes store one node name per key; it is returned as a one-element list.
    """
    import onnx

    return _metadata_record(onnx.load(str(path), load_external_data=False)) or {}


def _metadata_record(model) -> dict[str, list[str]] | None:
    for p in model.metadata_props:
        if p.key == PRUNED_METADATA_KEY:
            return {k: [v] if isinstance(v, str) else list(v) for k, v in json.loads(p.value).items()}
    return None


def _check_onnx(path: Path, layers: Literal["pruned", "all"] | list[str]) -> list[Violation]:
    import onnx

    if not path.exists():
        raise FileNotFoundError(f"no ONNX file at {path}")
    from qatsparse.export.graph import OnnxGraph

    model = onnx.load(str(path))
    graph = OnnxGraph(model)
    nodes = _weighted_nodes(graph)
    if layers == "all":
        names = [n for n in nodes if _onnx_weight(graph, *nodes[n]) is not None]
    elif layers == "pruned":
        recorded = _metadata_record(model)
        if recorded is None:
            raise ValueError(
                f"check_2to4({str(path)!r}): the ONNX file has no {PRUNED_METADATA_KEY!r} metadata "
                "(qatsparse.export.onnx.record_pruned_layers writes it); pass layers='all' or a list of node names"
            )
        names = list(dict.fromkeys(n for nodes_of in recorded.values() for n in nodes_of))
    elif isinstance(layers, str):
        raise ValueError(f"layers must be 'pruned', 'all' or a list of node names, got {layers!r}")
    else:
        names = list(layers)
    out = []
    for name in names:
        if name not in nodes:
            out.append(Violation(name, -1, "node not found in the ONNX graph"))
            continue
        found = _onnx_weight(graph, *nodes[name])
        if found is None:
            out.append(Violation(name, -1, "weight is not a constant (could not trace it back)"))
            continue
        w, axis = found
        worst, index = _worst_along(w, axis)
        if worst > 2:
            what = (
                f"{worst} nonzeros in the group of 4 along axis {axis} at {index}"
                if index
                else f"axis {axis} of the weight {w.shape} is not a multiple of 4"
            )
            out.append(Violation(name, worst, what, index))
    return out


def sparsity_summary(model: nn.Module) -> dict[str, float | int]:
    """Share of the prunable weights' parameters (Conv/Linear/attention projections) that sit in 2:4 weights,
    and the overall zero share.

    Example:
        >>> sparsity_summary(nn.Linear(4, 2, bias=False))["weights_2to4_share"]
        0.0
    """
    total = in_24 = zeros = 0
    for w in prunable_weights(model).values():
        n = w.weight.numel()
        total += n
        zeros += int((w.weight == 0).sum())
        if worst_group_nonzeros(w.weight, w.in_axis) <= 2:
            in_24 += n
    return {
        "weight_params": total,
        "weights_2to4_share": in_24 / total if total else 0.0,
        "zero_share": zeros / total if total else 0.0,
    }


def onnx_sparsity_summary(path: str | Path) -> dict[str, float | int]:
    """:func:`sparsity_summary` measured on an ONNX graph: the share of the Conv/ConvTranspose/Gemm/MatMul weight
    elements that sit in weights which are 2:4 along their reduction axis, and the zero share.

    Weights are traced back through Q/DQ/Cast/Identity/Transpose to their constant (INT8 weights count by
    their stored integers, whose zeros are the pruned weights); weights computed at run time are skipped.

    Example:
        >>> import tempfile, torch
        >>> from qatsparse.export.onnx import export_onnx
        >>> p = export_onnx(nn.Linear(8, 2), [torch.zeros(1, 8)], tempfile.mkdtemp() + "/m.onnx")
        >>> onnx_sparsity_summary(p)["weights_2to4_share"]
        0.0
    """
    import onnx

    from qatsparse.export.graph import OnnxGraph

    graph = OnnxGraph(onnx.load(str(path)))
    total = in_24 = zeros = 0
    for weight, axis in _weighted_nodes(graph).values():
        found = _onnx_weight(graph, weight, axis)
        if found is None:
            continue
        w, ax = found
        total += w.size
        zeros += int((w == 0).sum())
        if _worst_along(w, ax)[0] <= 2:
            in_24 += w.size
    return {
        "weight_params": total,
        "weights_2to4_share": in_24 / total if total else 0.0,
        "zero_share": zeros / total if total else 0.0,
    }
