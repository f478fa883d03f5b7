"""Constant folding of an ONNX graph: every node whose inputs are all constants becomes an initializer."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

#: Never folded: DequantizeLinear of a constant is how INT8 weights are stored (folding it would store
#: FP32 weights and lose the quantization); random ops are not constant.
_NO_FOLD = {"DequantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}
_MAX_FOLDED_ELEMENTS = 1 << 24


def fold_constants(proto: Any, in_place: bool = False) -> Any:
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

    if not in_place:  # in place: no second copy of every weight (the exporter's own proto is not kept)
        proto = copy.deepcopy(proto)
    graph = proto.graph
    # Initializers become arrays only when a node that could be folded reads them: a weight read by a Conv
    # stays in its proto instead of being copied once more.
    initializers = {i.name: i for i in graph.initializer}
    values: dict[str, np.ndarray] = {}

    def constant(name: str) -> bool:
        if name not in values and name in initializers:
            values[name] = numpy_helper.to_array(initializers[name])
        return name in values

    graph_outputs = {o.name for o in graph.output}
    opsets = list(proto.opset_import)
    kept, new_inits = [], []
    for node in graph.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NO_FOLD
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
            and not any(o in graph_outputs for o in node.output)
            and all(i == "" or i in values or i in initializers for i in node.input)
            and all(i == "" or constant(i) for i in node.input)
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
