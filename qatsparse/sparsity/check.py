"""Verify 2:4 sparsity of a PyTorch module or of an exported ONNX graph."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from torch import nn

from qatsparse.sparsity.masks import PRUNABLE_TYPES, worst_group_nonzeros

#: ONNX metadata key under which the export records the pruned layers ({module name: node name}).
PRUNED_METADATA_KEY = "qatsparse.pruned_layers"


@dataclass(frozen=True)
class Violation:
    """A layer that is not 2:4 along its input channels.

    Attributes:
        layer: module name (PyTorch) or node name (ONNX).
        worst_group: the largest count of nonzeros found in one group of 4 (3 or 4), or -1 when the
            layer was expected but not found.
        detail: a human-readable explanation.

    Example:
        >>> Violation("fc", 4, "4 nonzeros in a group of 4").layer
        'fc'
    """

    layer: str
    worst_group: int
    detail: str


def check_2to4(x: nn.Module | str | Path, layers: Literal["pruned", "all"] | list[str] = "pruned") -> list[Violation]:
    """Return the layers that violate 2:4 sparsity; ``[]`` means every checked layer is 2:4.

    Args:
        x: an ``nn.Module`` or the path of an ONNX file.
        layers: ``"pruned"`` (default) checks the layers recorded as pruned -- for an ONNX file the
            export's metadata, for a module the layers a :class:`~qatsparse.TwoFourSparsity` callback
            pruned (recorded on the module as ``_qatsparse_pruned``); ``"all"`` checks every weighted
            Conv/Gemm/MatMul (ONNX) or Conv2d/Linear (module); a list names the layers to check.

    Example:
        >>> lin = nn.Linear(8, 2); check_2to4(lin, layers="all")[0].worst_group
        4
    """
    if isinstance(x, nn.Module):
        return _check_module(x, layers)
    return _check_onnx(Path(x), layers)


def _check_module(model: nn.Module, layers: Literal["pruned", "all"] | list[str]) -> list[Violation]:
    modules = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    if layers == "all":
        names = list(modules)
    elif layers == "pruned":
        names = list(getattr(model, "_qatsparse_pruned", []))
    else:
        names = list(layers)
    out = []
    for name in names:
        if name not in modules:
            out.append(Violation(name, -1, "layer not found in the model"))
            continue
        worst = worst_group_nonzeros(modules[name].weight)
        if worst > 2:
            out.append(Violation(name, worst, f"{worst} nonzeros in a group of 4 input channels"))
    return out


# ---------------------------------------------------------------- ONNX
_PASS_THROUGH = {"DequantizeLinear", "QuantizeLinear", "Cast", "Identity"}


def _onnx_weight(graph, tensor_name: str, axis: int) -> tuple[np.ndarray, int] | None:
    """Follow Q/DQ/Cast/Transpose producers back to a constant; return it and the reduction axis on it."""
    import onnx.numpy_helper as nh

    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    name = tensor_name
    for _ in range(16):
        if name in inits:
            return nh.to_array(inits[name]), axis
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return nh.to_array(a.t), axis
            return None
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm is None:  # default: reverse the axes; rank unknown here -> give up
                return None
            axis = perm[axis]
        elif node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
    return None


def _worst_along(w: np.ndarray, axis: int) -> int:
    if w.shape[axis] % 4:
        return 4
    moved = np.moveaxis(w, axis, -1)
    nz = (moved != 0).reshape(-1, 4).sum(1)
    return int(nz.max()) if nz.size else 0


def _weighted_nodes(graph) -> dict[str, tuple[str, int]]:
    """node name -> (weight input name, reduction axis on that input) for Conv/Gemm/MatMul."""
    out = {}
    for n in graph.node:
        if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1:
            out[n.name] = (n.input[1], 1 if n.op_type == "Conv" else 0)
        elif n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            out[n.name] = (n.input[1], 1 if trans_b else 0)
        elif n.op_type == "MatMul":
            out[n.name] = (n.input[1], 0)
    return out


def pruned_layers_from_metadata(path: str | Path) -> dict[str, str]:
    """The {module name: ONNX node name} map that the export stored, or {} when absent."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for p in model.metadata_props:
        if p.key == PRUNED_METADATA_KEY:
            return dict(json.loads(p.value))
    return {}


def _check_onnx(path: Path, layers: Literal["pruned", "all"] | list[str]) -> list[Violation]:
    import onnx

    if not path.exists():
        raise FileNotFoundError(f"no ONNX file at {path}")
    model = onnx.load(str(path))
    graph = model.graph
    nodes = _weighted_nodes(graph)
    if layers == "all":
        names = [n for n in nodes if _onnx_weight(graph, *nodes[n]) is not None]
    elif layers == "pruned":
        names = list(pruned_layers_from_metadata(path).values())
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
        worst = _worst_along(w, axis)
        if worst > 2:
            out.append(Violation(name, worst, f"{worst} nonzeros in a group of 4 along axis {axis}"))
    return out


def sparsity_summary(model: nn.Module) -> dict[str, float | int]:
    """Share of Conv2d/Linear weight parameters that sit in 2:4 layers, and the overall zero share.

    Example:
        >>> sparsity_summary(nn.Linear(4, 2, bias=False))["weights_2to4_share"]
        0.0
    """
    total = in_24 = zeros = 0
    for m in model.modules():
        if isinstance(m, PRUNABLE_TYPES):
            n = m.weight.numel()
            total += n
            zeros += int((m.weight == 0).sum())
            if worst_group_nonzeros(m.weight) <= 2:
                in_24 += n
    return {
        "weight_params": total,
        "weights_2to4_share": in_24 / total if total else 0.0,
        "zero_share": zeros / total if total else 0.0,
    }
