"""Exact graph rewrites of exported ONNX: weights TensorRT can fuse, patterns ONNX Runtime can run.

:func:`slice_dequantized_weights` gives every GEMM of a packed, partly used INT8 weight its own INT8
initializer. :func:`raise_underflowing_bounds` keeps ``F.normalize``'s epsilon alive in FP16.
:func:`sink_transposes_below_matmuls` removes a pattern on which ONNX Runtime crashes:

**The ONNX Runtime crash on INT8+FP16 graphs** (ONNX Runtime 1.2x, CPU execution provider, default
``ORT_ENABLE_ALL``): a ``MatMul`` whose first input comes from a ``Transpose`` with ``perm=[1, 0, 2]``
and whose second input is a 2-D constant, in FP16. The CPU provider has no FP16 ``MatMul`` kernel, so
``InsertCastTransformer`` wraps the node in FP32 casts; ``MatmulTransposeFusion`` then folds the
transpose into a ``FusedMatMul`` (``transBatchA``) and leaves the ``Transpose`` node consuming a tensor
that no longer exists. The next pass that walks the graph (the level-3 ``NchwcTransformer``) follows
that dangling input and the process dies with SIGSEGV at session creation (disabling
``MatmulTransposeFusion`` or ``NchwcTransformer`` avoids it; whether a given graph crashes also depends
on the ops around the pattern). PyTorch's ``nn.MultiheadAttention`` with ``batch_first=True`` exported
this pattern (it transposes to sequence-first before its unquantized input projection); a user's
``x.transpose(0, 1)`` before an unquantized Linear can too. Minimal reproduction: FP32 input -> ``Cast``
to FP16 -> ``Transpose`` [1, 0, 2] -> ``MatMul`` with an FP16 initializer (tests/test_attention.py opens
it in a subprocess).

:func:`sink_transposes_below_matmuls` removes the pattern without changing a value: when the
transpose keeps the last axis in place and ``B`` is 2-D, ``MatMul(Transpose(x), B)`` equals
``Transpose(MatMul(x, B))`` (a 2-D ``B`` multiplies the last axis only), so the transpose is moved
below the MatMul. TensorRT fuses transposes either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def sink_transposes_below_matmuls(model: Any) -> int:
    """Move every ``Transpose`` that keeps the last axis and feeds ``MatMul``'s first input below that MatMul
    when its second input is a 2-D constant (through Q/DQ/Cast), in place. Returns how many were moved.

    Example:
        >>> import numpy as np
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
        >>> g = helper.make_graph([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
        ...     helper.make_node("MatMul", ["t", "w"], ["y"], name="mm")], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 2, 3])], [w])
        >>> m = helper.make_model(g); sink_transposes_below_matmuls(m), [n.op_type for n in m.graph.node]
        (1, ['MatMul', 'Transpose'])
    """
    from onnx import helper

    from qatsparse.export.graph import OnnxGraph, attribute

    graph = OnnxGraph(model)
    moved = 0
    new_nodes = []
    for node in model.graph.node:
        new_nodes.append(node)
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        t = graph.producer.get(node.input[0])
        perm = attribute(t, "perm") if t is not None and t.op_type == "Transpose" else None
        if perm is None or perm[-1] != len(perm) - 1:
            continue
        b = graph.trace_constant(node.input[1])
        if b is None or b.array.ndim != 2:
            continue
        out = node.output[0]
        inner = f"{out}__before_transpose"
        node.input[0] = t.input[0]
        node.output[0] = inner
        name = f"{node.name or out}/SunkTranspose"
        new_nodes.append(helper.make_node("Transpose", [inner], [out], perm=list(perm), name=name))
        moved += 1
    if moved:
        used = {i for n in new_nodes for i in n.input} | {o.name for o in model.graph.output}
        kept = [n for n in new_nodes if n.op_type != "Transpose" or any(o in used for o in n.output)]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        del model.graph.value_info[:]  # shapes of moved tensors changed; shape inference rebuilds them
    return moved


def _run_node(node: Any, feeds: dict[str, np.ndarray], opsets: list[Any]) -> list[np.ndarray]:
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    g = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
        [helper.make_tensor_value_info(o, 0, None) for o in node.output if o],
    )
    return [np.asarray(o) for o in ReferenceEvaluator(helper.make_model(g, opset_imports=opsets)).run(None, feeds)]


def slice_dequantized_weights(model: Any) -> int:
    """Replace ``Slice``/``Split`` of a dequantized constant by ``DequantizeLinear`` of sliced INT8 constants, in
    place; returns how many slicing nodes were replaced.

    A packed weight used in parts (the query and key/value rows of ``nn.MultiheadAttention``'s input
    projection in cross-attention) is exported as one INT8 constant, its ``DequantizeLinear`` and a
    ``Slice``/``Split`` per part: the GEMMs would then take their weights through a slicing op, which
    TensorRT does not fuse into INT8 weights, and no weight could be traced to its constant. Slicing
    the INT8 values (and the per-channel scales along the sliced axis) before dequantizing gives exactly
    the same values, one INT8 initializer per GEMM.

    Example:
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> q = numpy_helper.from_array(np.arange(8, dtype=np.int8).reshape(4, 2), "q")
        >>> s = numpy_helper.from_array(np.full(4, 0.5, np.float32), "s")
        >>> z = numpy_helper.from_array(np.zeros(4, np.int8), "z")
        >>> g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0),
        ...     helper.make_node("Split", ["w"], ["a", "b"], axis=0, num_outputs=2)], "g", [],
        ...     [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in "ab"], [q, s, z])
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
        >>> slice_dequantized_weights(m), [n.op_type for n in m.graph.node]
        (1, ['DequantizeLinear', 'DequantizeLinear'])
    """
    from onnx import helper, numpy_helper

    from qatsparse.export.graph import OnnxGraph, attribute

    graph = OnnxGraph(model)
    opsets = list(model.opset_import)
    replaced = 0
    new_nodes, new_inits = [], []
    for node in model.graph.node:
        dq = graph.producer.get(node.input[0]) if node.op_type in ("Slice", "Split") and node.input else None
        ok = (
            dq is not None
            and dq.op_type == "DequantizeLinear"
            and all(graph.is_const(i) for i in dq.input if i)
            and all(graph.is_const(i) for i in node.input[1:] if i)
        )
        if not ok:
            new_nodes.append(node)
            continue
        q = graph.const(dq.input[0])
        scale = graph.const(dq.input[1])
        zp = graph.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        axis = attribute(dq, "axis", 1) % q.ndim
        others = {i: graph.const(i) for i in node.input[1:] if i}
        parts = _run_node(node, {node.input[0]: q, **others}, opsets)
        rows = None
        if scale.ndim == 1 and scale.size > 1:  # per channel: which channels each part holds
            shape = [1] * q.ndim
            shape[axis] = -1
            index = np.broadcast_to(np.arange(q.shape[axis], dtype=np.int64).reshape(shape), q.shape).copy()
            picked = _run_node(node, {node.input[0]: index, **others}, opsets)
            rows = [np.moveaxis(r, axis, 0).reshape(r.shape[axis], -1)[:, 0] for r in picked]
        for k, (out, part) in enumerate(zip([o for o in node.output if o], parts)):
            base = f"{out}__int8"
            inputs = [base, f"{base}_scale"]
            new_inits.append(numpy_helper.from_array(part.astype(q.dtype), base))
            new_inits.append(numpy_helper.from_array(scale[rows[k]] if rows is not None else scale, f"{base}_scale"))
            if zp is not None:
                inputs.append(f"{base}_zero_point")
                new_inits.append(numpy_helper.from_array(zp[rows[k]] if rows is not None else zp, f"{base}_zero_point"))
            name = f"{node.name or out}/Dequantize_{k}"
            new_nodes.append(helper.make_node("DequantizeLinear", inputs, [out], axis=axis, name=name))
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(_live(new_nodes, {o.name for o in model.graph.output}))
        model.graph.initializer.extend(new_inits)
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        del model.graph.value_info[:]
    return replaced


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """``nodes`` without those whose outputs nothing uses (repeatedly)."""
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


#: the smallest positive FP16 value (a subnormal)
_FP16_TINY = float(2.0**-24)


def raise_underflowing_bounds(model: Any) -> list[str]:
    """Raise each positive constant lower bound of a ``Clip`` (its ``min``) or ``Max`` that FP16 would flush to 0
    to the smallest FP16 value, in place; returns the names of the nodes changed.

    ``F.normalize`` exports as ``x / Clip(ReduceL2(x), min=1e-12)``: in FP16 the bound becomes 0 and an all-zero
    vector gives 0 / 0 = NaN where FP32 gives 0 -- torchvision's Swin V2 normalizes the keys of the zero tokens
    that pad a window larger than the feature map, and the NaN then spreads through the attention (cosine 0.29
    against the PyTorch model at 64 px). The bound moves from below 6e-8 to 6e-8, which changes no value that
    FP16 can represent.

    Example:
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> eps = numpy_helper.from_array(np.array(1e-12, np.float32), "eps")
        >>> g = helper.make_graph([helper.make_node("Clip", ["x", "eps"], ["y"], name="clip")], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [eps])
        >>> m = helper.make_model(g); raise_underflowing_bounds(m)
        ['clip']
        >>> float(numpy_helper.to_array(m.graph.initializer[-1]))
        5.960464477539063e-08
    """
    from onnx import numpy_helper

    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                consts[n.output[0]] = value
    changed = []
    for n in graph.node:
        slots = [1] if n.op_type == "Clip" else range(len(n.input)) if n.op_type == "Max" else []
        for i in slots:
            name = n.input[i] if i < len(n.input) else ""
            if name not in consts:
                continue
            a = numpy_helper.to_array(consts[name])
            if a.dtype != np.float32 or not ((a > 0) & (a < _FP16_TINY)).any():
                continue
            raised = np.where((a > 0) & (a < _FP16_TINY), np.float32(_FP16_TINY), a).astype(np.float32)
            new = f"{name}__fp16_bound"
            if new not in consts:
                graph.initializer.append(numpy_helper.from_array(raised, new))
                consts[new] = graph.initializer[-1]
            n.input[i] = new
            changed.append(n.name)
    return changed
