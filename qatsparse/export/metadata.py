"""What an exported graph records in its metadata and how its nodes map back to modules: the pruned layers
(``{weight key: [node names]}``) and the pruned weights it has no node for."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qatsparse.export.atomic import atomic_path
from qatsparse.export.graph import module_name_of_node


def nodes_of_modules(graph: Any, module_names: Sequence[str]) -> tuple[set[str], list[str]]:
    """Names of the nodes exported from the given modules (or their children), and the modules with none.

    Example:
        >>> from onnx import helper
        >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="/head/fc/Relu")], "g", [], [])
        >>> nodes_of_modules(g, ["head", "body"])
        ({'/head/fc/Relu'}, ['body'])
    """
    found: set[str] = set()
    missing = []
    for m in module_names:
        hits = {n.name for n in graph.node if (mod := module_name_of_node(n.name)) == m or mod.startswith(m + ".")}
        if not hits:
            missing.append(m)
        found |= hits
    return found, missing


def weighted_node_names(path: str | Path) -> dict[str, str]:
    """{module name: node name} for the Conv/Gemm/MatMul nodes of an exported graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    out: dict[str, str] = {}
    for n in graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            out.setdefault(module_name_of_node(n.name), n.name)
    return out


def set_metadata(path: str | Path, metadata: Mapping[str, str]) -> None:
    """Add or replace metadata entries of an ONNX file (atomically)."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def get_metadata(path: str | Path) -> dict[str, str]:
    """The metadata entries of an ONNX file."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def record_pruned_layers(
    path: str | Path, module_names: Sequence[str], model: nn.Module | None = None, inputs: Any = None
) -> dict[str, list[str]]:
    """Store ``{weight key: [node names]}`` of the pruned weights in the ONNX metadata and return it.

    With ``model`` (the module the graph was exported from, or one with the same weights) every weighted
    node's constant is compared with the pruned weights (:func:`qatsparse.export.locate.locate_weights`):
    this finds weights used without their module's ``forward`` (attention projections, torchvision Swin)
    and survives quantization and FP16. Without ``model`` a key is found by the node's scope name (the
    first Conv/Gemm/MatMul exported from that module), which only works for ``Linear``/``Conv`` layers
    called through their own ``forward``. With ``model`` and ``inputs`` (the export's example inputs), a
    pruned weight the graph has no node for because its layer does not run in eval mode or computes a
    constant (:func:`qatsparse.export.locate.absent_reasons`) is recorded with no nodes, and the reason is
    stored under :data:`ABSENT_METADATA_KEY`: TensorRT never runs it.

    Raises:
        ValueError: a pruned weight has no Conv/Gemm/MatMul node in the graph, for no reason found.
    """
    from qatsparse.sparsity.check import PRUNED_METADATA_KEY

    absent: dict[str, str] = {}
    if model is not None:
        from qatsparse.export.locate import absent_reasons, locate_weights

        mapping, missing = locate_weights(path, model, list(module_names))
        nodes = sorted(n for ns in mapping.values() for n in ns)
        if missing and inputs is not None:
            absent = absent_reasons(model, inputs, missing)
            missing = [m for m in missing if m not in absent]
    else:
        by_scope = weighted_node_names(path)
        missing = [m for m in module_names if m not in by_scope]
        mapping = {m: [by_scope[m]] for m in module_names if m in by_scope}
        nodes = sorted(by_scope.values())
    if missing:
        raise ValueError(f"pruned layers not found in {path}: {missing}; weighted nodes: {nodes}")
    mapping = {m: mapping.get(m, []) for m in module_names}
    set_metadata(path, {PRUNED_METADATA_KEY: json.dumps(mapping), ABSENT_METADATA_KEY: json.dumps(absent)})
    return mapping


#: ONNX metadata: ``{weight key: reason}`` of the pruned weights the graph has no node for (see
#: :func:`record_pruned_layers`).
ABSENT_METADATA_KEY = "qatsparse.pruned_not_in_graph"
