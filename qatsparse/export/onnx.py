"""ONNX export: FP32 and Q/DQ graphs with a dynamic batch axis, written atomically, checked."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qatsparse.export.graph import module_name_of_node

DEFAULT_OPSET = 17
#: The notice ``torch.onnx.export(dynamo=False)`` emits since PyTorch 2.9 (a regex for ``filterwarnings``).
LEGACY_EXPORTER_NOTICE = r"You are using the legacy TorchScript-based ONNX export"
#: Where the TorchScript exporter calls its own deprecated helpers (``setup_onnx_logging``): a DeprecationWarning
#: attributed to this module is torch's, not the user's.
LEGACY_EXPORTER_MODULE = r"torch\.onnx\._internal\.torchscript_exporter"
#: Opset at which QuantizeLinear/DequantizeLinear take FP16 inputs and scales (used for INT8 + FP16 graphs).
FP16_QDQ_OPSET = 19


def default_io_names(n: int, stem: str) -> list[str]:
    """``["input"]`` for one tensor, ``["input_0", "input_1", ...]`` for several.

    Example:
        >>> default_io_names(2, "output")
        ['output_0', 'output_1']
    """
    return [stem] if n == 1 else [f"{stem}_{i}" for i in range(n)]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A failure inside the block leaves ``path`` as it was (absent or the previous file), never half written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the final file gets the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _output_names_of(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, list[str] | None]:
    """Number of outputs, and their names when the model returns a dict (its keys)."""
    from qatsparse.batches import as_outputs

    with torch.no_grad():
        y = model(*inputs)  # keyword inputs: `model` was made positional by _positional_forward
    names = [str(k) for k in y] if isinstance(y, Mapping) else None
    return len(as_outputs(y)), names


def _positional_forward(model: nn.Module, names: Sequence[str]) -> None:
    """Make ``model`` (a private copy) take its keyword inputs ``names`` positionally, in that order.

    The TorchScript exporter traces positional tensors; its own trailing-dict convention reorders the
    keywords by ``forward``'s signature and cannot serve ``forward(**inputs)``. An instance attribute
    (not a wrapper module) keeps the node scope names, which map ONNX nodes back to module names.
    """
    keyword_forward = model.forward

    def forward(*tensors: torch.Tensor) -> Any:
        return keyword_forward(**dict(zip(names, tensors)))

    model.forward = forward  # type: ignore[method-assign]


def default_input_names(module: Any, n: int) -> list[str]:
    """Input names: the keys of a dict ``example_input_array`` when the module has one, else numbered.

    Example:
        >>> default_input_names(None, 2)
        ['input_0', 'input_1']
    """
    ex = getattr(module, "example_input_array", None)
    if isinstance(ex, Mapping) and len(ex) == n:
        return [str(k) for k in ex]
    return default_io_names(n, "input")


def save_model(proto: Any, path: str | Path) -> Path:
    """Check ``proto`` (checker + strict shape inference) and write it atomically to ``path``."""
    import onnx

    path = Path(path)
    onnx.checker.check_model(proto, full_check=True)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def export_onnx(
    model: nn.Module,
    inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    path: str | Path,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: Mapping[str, str] | None = None,
    fold: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> Path:
    """Export ``model`` to ONNX at ``path`` (atomically) and check the result.

    Uses the TorchScript exporter (``dynamo=False``): the torch.export-based exporter cannot export
    fake-quantized models with a dynamic batch axis in PyTorch 2.14, and its default graph optimization
    changes the numbers of some Q/DQ graphs (``benchmarks/exporter_trial.py``; docs/design.md). Only the
    TorchScript exporter's own deprecation notices are silenced. The model is exported on the CPU in eval mode
    from a copy, so the caller's model is not touched; ``nn.MultiheadAttention`` is exported through
    :func:`qatsparse.attention.attention_forward` (PyTorch's own export fixes the sequence length into its
    reshapes) with PyTorch's attention fast paths off. Every input and output gets a dynamic batch axis
    (``"batch"``) unless ``dynamic_batch`` is False; ``dynamic_axes`` ``{input name: {axis: dim name}}`` adds
    more (see :mod:`qatsparse.export.shapes`). Output names default to the keys of a dict output, else
    ``output``/``output_i``. Keyword inputs (a dict, called as ``model(**inputs)``) become graph inputs named
    after their keywords, in the dict's order.
    With ``fold`` the constant subgraphs the exporter leaves (Q/DQ scales computed from
    buffers, quantization of constant weights) are folded (see :func:`fold_constants`), so every
    Q/DQ scale is a constant as TensorRT requires, and an INT8 weight used in parts gets one INT8
    initializer per part (:func:`qatsparse.export.rewrites.slice_dequantized_weights`). ``onnx.checker``
    and shape inference must pass.

    Example:
        >>> p = export_onnx(nn.Linear(4, 2), [torch.zeros(1, 4)], tempfile.mkdtemp() + "/m.onnx")
        >>> p.name
        'm.onnx'
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (per-channel Q/DQ and TensorRT 10/11), got {opset}")
    from qatsparse.attention import explicit_attention, fast_paths_off

    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    explicit_attention(model)  # plain ops with symbolic shapes instead of PyTorch's fused attention
    if isinstance(inputs, Mapping):
        keywords = [str(k) for k in inputs]
        _positional_forward(model, keywords)
        input_names = list(input_names) if input_names else keywords
        inputs = tuple(inputs.values())
    inputs = tuple(t.detach().cpu() for t in inputs)
    with fast_paths_off():
        names = (input_names, output_names)
        return _export(model, inputs, path, *names, opset, dynamic_batch, metadata, fold, dynamic_axes)


def _export(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    opset: int,
    dynamic_batch: bool,
    metadata: Mapping[str, str] | None,
    fold: bool,
    extra_axes: Mapping[str, Mapping[int, str]] | None,
) -> Path:
    import onnx

    from qatsparse.export.rewrites import slice_dequantized_weights
    from qatsparse.export.shapes import onnx_dynamic_axes

    n_out, dict_names = _output_names_of(model, inputs)
    input_names = list(input_names) if input_names else default_io_names(len(inputs), "input")
    output_names = list(output_names) if output_names else (dict_names or default_io_names(n_out, "output"))
    if len(input_names) != len(inputs):
        raise ValueError(f"{len(input_names)} input names for {len(inputs)} inputs: {input_names}")
    if len(output_names) != n_out:
        raise ValueError(f"{len(output_names)} output names for {n_out} outputs: {output_names}")
    if len(set(input_names) | set(output_names)) != len(input_names) + len(output_names):
        raise ValueError(f"input and output names must be unique, got {input_names} and {output_names}")
    dynamic_axes = {
        **onnx_dynamic_axes(input_names, extra_axes or {}, dynamic_batch),
        **({n: {0: "batch"} for n in output_names} if dynamic_batch else {}),
    }
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # Only the exporter's own deprecation notices are silenced (docs/design.md says why this exporter);
        # tracer warnings, which signal a trace that may not generalise, reach the user.
        warnings.filterwarnings("ignore", message=LEGACY_EXPORTER_NOTICE, category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=LEGACY_EXPORTER_MODULE)
        torch.onnx.export(
            model,
            inputs,
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes or None,
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        if fold:
            proto = fold_constants(proto)
            slice_dequantized_weights(proto)
        for k, v in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(proto, full_check=True)
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        onnx.save(proto, str(tmp))
    return path


#: Never folded: DequantizeLinear of a constant is how INT8 weights are stored (folding it would store
#: FP32 weights and lose the quantization); random ops are not constant.
_NO_FOLD = {"DequantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}
_MAX_FOLDED_ELEMENTS = 1 << 24


def fold_constants(proto: Any) -> Any:
    """Replace every node whose inputs are all constants by an initializer holding its output.

    The TorchScript exporter leaves ``Clip(amax / 127, tiny)`` feeding each Q/DQ scale and a
    ``QuantizeLinear`` on each constant weight; TensorRT needs the scales to be constants, and a weight
    stored as INT8 followed by ``DequantizeLinear`` is what TensorRT (and ModelOpt's exports) expect.
    Each node is evaluated with ONNX's reference implementation at the model's own opset. No library we
    depend on folds ONNX constants without also rewriting the graph in backend-specific ways (ONNX
    Runtime's optimizer) or needing extra packages (onnx-graphsurgeon), hence this small pass.

    Example:
        >>> import onnx
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> g = helper.make_graph([helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])],
        ...     "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        ...     [numpy_helper.from_array(np.array([-1.0, 2.0], np.float32), "c")])
        >>> [n.op_type for n in fold_constants(helper.make_model(g)).graph.node]
        ['Add']
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    proto = copy.deepcopy(proto)
    graph = proto.graph
    values: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    opsets = list(proto.opset_import)
    kept, new_inits = [], []
    for node in graph.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NO_FOLD
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
            and all(i == "" or i in values for i in node.input)
            and not any(o in graph_outputs for o in node.output)
        )
        if foldable:
            ins = [i for i in node.input if i]
            g = helper.make_graph(
                [node],
                "fold",
                [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), None) for i in ins],
                [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
            )
            try:
                outs = ReferenceEvaluator(helper.make_model(g, opset_imports=opsets)).run(
                    None, {i: values[i] for i in ins}
                )
            except Exception:  # an op the reference cannot run: keep the node as it is
                outs = None
            if outs is not None and all(np.asarray(o).size <= _MAX_FOLDED_ELEMENTS for o in outs):
                for name, arr in zip([o for o in node.output if o], outs):
                    arr = np.asarray(arr)
                    values[name] = arr
                    new_inits.append(numpy_helper.from_array(arr, name))
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return proto


def _drop_unused_initializers(graph: Any) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    removed = {i.name for i in graph.initializer} - {i.name for i in keep}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph_inputs = [i for i in graph.input if i.name not in removed]
    del graph.input[:]
    graph.input.extend(graph_inputs)
    vis = [v for v in graph.value_info if v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(vis)


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
