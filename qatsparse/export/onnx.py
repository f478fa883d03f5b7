"""ONNX export: FP32 and Q/DQ graphs with a dynamic batch axis, written atomically, checked."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

DEFAULT_OPSET = 17


def default_io_names(n: int, stem: str) -> list[str]:
    """``["input"]`` for one tensor, ``["input_0", "input_1", ...]`` for several.

    Example:
        >>> default_io_names(2, "output")
        ['output_0', 'output_1']
    """
    return [stem] if n == 1 else [f"{stem}_{i}" for i in range(n)]


@contextlib.contextmanager
def _atomic_path(path: Path):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _count_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    from qatsparse.batches import as_outputs

    with torch.no_grad():
        return len(as_outputs(model(*inputs)))


def export_onnx(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    path: str | Path,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export ``model`` to ONNX at ``path`` (atomically) and check the result.

    Uses the TorchScript exporter (``dynamo=False``): it maps PyTorch's fake-quantize ops to
    QuantizeLinear/DequantizeLinear, which the dynamo exporter does not do for quantized training
    graphs. The model is exported on the CPU in eval mode from a copy, so the caller's model is not
    touched. Every input and output gets a dynamic batch axis (``"batch"``) unless ``dynamic_batch``
    is False. ``onnx.checker`` and shape inference must pass.

    Example:
        >>> p = export_onnx(nn.Linear(4, 2), [torch.zeros(1, 4)], tempfile.mkdtemp() + "/m.onnx")
        >>> p.name
        'm.onnx'
    """
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be >= 17 (per-channel Q/DQ and TensorRT 10/11), got {opset}")
    path = Path(path)
    inputs = tuple(t.detach().cpu() for t in inputs)
    model = copy.deepcopy(model).cpu().eval()
    n_out = _count_outputs(model, inputs)
    input_names = list(input_names) if input_names else default_io_names(len(inputs), "input")
    output_names = list(output_names) if output_names else default_io_names(n_out, "output")
    if len(input_names) != len(inputs):
        raise ValueError(f"{len(input_names)} input names for {len(inputs)} inputs: {input_names}")
    if len(output_names) != n_out:
        raise ValueError(f"{len(output_names)} output names for {n_out} outputs: {output_names}")
    dynamic_axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    with _atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            inputs,
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        for k, v in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(proto, full_check=True)
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        onnx.save(proto, str(tmp))
    return path


def module_name_of_node(node_name: str) -> str:
    """The module a TorchScript-exported node came from, read off its scope name.

    The exporter names nodes ``/<scope>/.../<Op>``. A scope level is a child's attribute name, or,
    for children of containers, ``<attribute>.<key>[.<key>...]`` where ``<attribute>`` is the last
    level with that name: ``/features/features.1/block/block.0/Conv`` is ``features.1.block.0``.

    Example:
        >>> module_name_of_node("/layer2/layer2.0/downsample/downsample.0/Conv")
        'layer2.0.downsample.0'
    """
    anchors: dict[str, str] = {}
    full = ""
    for part in [p for p in node_name.split("/") if p][:-1]:
        head, _, rest = part.partition(".")
        if rest and head in anchors:
            full = f"{anchors[head]}.{rest}"
        else:
            full = f"{full}.{part}" if full else part
            anchors[head] = full
    return full


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
    with _atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def record_pruned_layers(path: str | Path, module_names: Sequence[str]) -> dict[str, str]:
    """Store {module name: node name} of the pruned layers in the ONNX metadata and return it.

    Raises:
        ValueError: a pruned module has no Conv/Gemm/MatMul node in the graph.
    """
    from qatsparse.sparsity.check import PRUNED_METADATA_KEY

    nodes = weighted_node_names(path)
    missing = [m for m in module_names if m not in nodes]
    if missing:
        raise ValueError(f"pruned layers not found in {path}: {missing}; nodes: {sorted(nodes)}")
    mapping = {m: nodes[m] for m in module_names}
    set_metadata(path, {PRUNED_METADATA_KEY: json.dumps(mapping)})
    return mapping
