"""Put FP16 into the ONNX graph: the remainder of a Q/DQ graph, or a whole FP32 graph, runs in half.

TensorRT 11 is strongly typed only: it runs each layer in the type the graph gives it, so FP16 has to
be in the ONNX (cast nodes and FP16 initializers) -- a Q/DQ graph whose non-quantized remainder is FP32
runs that remainder in FP32. ModelOpt's AutoCast does this conversion but is not a dependency here,
and onnxconverter-common's converter does not know Q/DQ typing rules, so this module holds a small
pass driven by the ONNX operator schemas:

* every float tensor a node consumes becomes FP16 where the node's schema accepts FP16 for that input
  (QuantizeLinear/DequantizeLinear accept FP16 from opset 19: their scales turn FP16 too, so the
  dequantized tensors are FP16 -- the form TensorRT fuses); inputs whose schema allows only FP32
  (e.g. Resize ``scales``, Q/DQ below opset 19) keep FP32 with a ``Cast`` in front;
* nodes exported from modules listed in ``keep_fp32`` (e.g. layers whose activations overflow FP16)
  run in FP32 with casts around them;
* where the model itself computes in float32 (``q.float() ... out.to(dtype)``: in the FP32 graph, Casts to
  float of activations that are already float) the nodes in between stay FP32 and the closing cast casts to
  FP16 (see :func:`explicit_fp32_nodes`);
* graph inputs and outputs keep FP32 (``keep_io_types``), with a ``Cast`` after each input and before
  each output;
* constants are converted once, at conversion time (clamped to the FP16 range, reported), so no cast
  of a weight is left for the runtime;
* a positive ``Clip``/``Max`` lower bound below the smallest FP16 (``F.normalize``'s 1e-12) is raised to it, so
  that it does not flush to 0 (0 / 0 = NaN on a zero vector);
* a ``Transpose`` feeding a ``MatMul`` with a 2-D constant weight is moved below it (exact; ONNX Runtime's
  CPU optimizer crashes on that pattern in FP16, see :mod:`qatsparse.export.rewrites`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(2.0**-24)  # smallest positive FP16 (subnormal): Q/DQ scales below it would become 0
#: share of a constant's norm that may flush to 0 in FP16 before it counts as changed
FLUSH_SHARE = 0.01
#: ops whose constant inputs are a layer's numbers (weights, biases, normalization parameters, Q/DQ scales)
_NUMERIC_USERS = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "LayerNormalization", "InstanceNormalization",
     "GroupNormalization", "QuantizeLinear", "DequantizeLinear", "PRelu"}
)  # fmt: skip
#: the inputs of those ops that multiply (weights, normalization scales, Q/DQ scales): a value flushed to 0
#: there can remove a layer's output; an added one (bias, shift, mean) flushed to 0 changes a sum by less
#: than 2**-24, below the FP16 resolution of any activation above 2**-14, so that is only noted
_MULTIPLIES = {"Conv": {1}, "ConvTranspose": {1}, "Gemm": {0, 1}, "MatMul": {0, 1}, "PRelu": {1},
               "BatchNormalization": {1}, "LayerNormalization": {1}, "InstanceNormalization": {1},
               "GroupNormalization": {1}, "QuantizeLinear": {0, 1}, "DequantizeLinear": {1}}  # fmt: skip
_PASS_ON = frozenset({"Cast", "Transpose", "Identity", "Reshape", "Unsqueeze", "Squeeze"})
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class FP16Conversion:
    """What :func:`convert_to_fp16` did: casts added, nodes kept in FP32, values clamped.

    Example:
        >>> FP16Conversion().casts_added
        0
    """

    casts_added: int = 0
    kept_fp32_nodes: list[str] = field(default_factory=list)
    missing_modules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: constant name -> what the conversion changed in it (clamped, flushed, scales raised)
    changed: dict[str, str] = field(default_factory=dict)
    #: the constants of ``changed`` whose only change is values flushed to 0
    flushed_only: set[str] = field(default_factory=set)
    #: the changes that alter a layer's numbers, with the module named (the export fails or warns on them)
    problems: list[str] = field(default_factory=list)
    #: nodes kept FP32 because the model computes them in float32 explicitly (``x.float()``)
    explicit_fp32_nodes: list[str] = field(default_factory=list)


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _allowed_types(schema: Any, param: Any) -> set[str]:
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    return constraints.get(param.type_str, {param.type_str})


def _param(params: Sequence[Any], i: int) -> Any | None:
    if i < len(params):
        return params[i]
    last = params[-1] if params else None
    if last is not None and last.option.name == "Variadic":
        return last
    return None


def _to_fp16_array(arr: np.ndarray, is_scale: bool, name: str, conv: FP16Conversion) -> np.ndarray:
    a = arr.astype(np.float32)
    changes = []
    over = int((np.abs(a) > FP16_MAX).sum())
    if over:
        changes.append(f"{over} value(s) beyond the FP16 range clamped to +-{FP16_MAX:g}")
        a = np.clip(a, -FP16_MAX, FP16_MAX)
    if is_scale:
        small = int(((a > 0) & (a < FP16_TINY)).sum())
        if small:
            changes.append(f"{small} Q/DQ scale(s) below the smallest FP16 raised to {FP16_TINY:g}")
            a = np.where((a > 0) & (a < FP16_TINY), FP16_TINY, a)
    out = a.astype(np.float16)
    lost = (a != 0) & (out == 0)
    norm = float(np.linalg.norm(a.astype(np.float64)))
    if lost.any() and float(np.linalg.norm(a[lost].astype(np.float64))) >= FLUSH_SHARE * norm:
        changes.append(
            f"{int(lost.sum())} of {int((a != 0).sum())} nonzero value(s) flushed to 0 (below the smallest FP16)"
        )
        if len(changes) == 1:
            conv.flushed_only.add(name)
    if changes:
        conv.changed[name] = "; ".join(changes)
        conv.notes.append(f"{name}: {conv.changed[name]}")
    return out


def _harmful_changes(graph: Any, conv: FP16Conversion, renamed: dict[str, str]) -> list[str]:
    """The constant changes that alter a layer's numbers -- a weight, bias, normalization parameter or Q/DQ
    scale clamped, or a multiplying one flushed to 0 -- named by module; a mask or fill value (e.g.
    ``finfo.min`` in an attention mask) clamped to the FP16 range acts the same and is only noted."""
    from qatsparse.export.onnx import module_name_of_node

    consumers: dict[str, list[tuple[Any, int]]] = {}
    for n in graph.node:
        for i, t in enumerate(n.input):
            consumers.setdefault(t, []).append((n, i))
    out = []
    for name, what in conv.changed.items():
        stack, users = [name, renamed.get(name, "")], []
        while stack:
            t = stack.pop()
            for n, i in consumers.get(t, []):
                if n.op_type in _PASS_ON:  # follow a weight through its dequantize/cast/transpose
                    stack.extend(n.output)
                else:
                    users.append((n, i))
        hit = [n for n, i in users if n.op_type in _NUMERIC_USERS]
        if name in conv.flushed_only:
            hit = [n for n, i in users if i in _MULTIPLIES.get(n.op_type, ())]
        if hit:
            modules = sorted({module_name_of_node(n.name) or n.name for n in hit})
            out.append(f"{', '.join(modules)} ({hit[0].op_type} constant {name}): {what}")
    return out


#: ops whose outputs carry a tensor's shape, not its values
_SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape"})


def explicit_fp32_nodes(graph: Any, elem: dict[str, int]) -> tuple[set[str], set[str], set[str]]:
    """Where the model computes in float32 on purpose: ``(opening casts, nodes, closing casts)``.

    In the FP32 graph, ``x.float()`` and ``x.to(dtype)`` of an activation are Casts to float of a tensor that is
    already float (the exporter writes them although they change nothing). A region that such a cast opens and
    another one closes is the model asking for float32 in between (timm's LiteMLA runs its linear attention
    ``q.float() ... out.to(dtype)`` in FP32 because its sums overflow FP16): its nodes stay FP32 and the closing
    cast casts to FP16. From an opening cast the region follows the values (PyTorch's type promotion: float32
    in, float32 out) and ends at a layer with weights or a Q/DQ (a ``_NUMERIC_USERS`` op with a constant-computed
    input), at another Cast, or at a graph output; only the nodes on a path to a closing cast count. An opening
    cast that nothing closes (``x.type_as(v)`` after a rotary embedding, ``logits.float()``) is not a float32
    region, and casts of values computed from shapes only (the exporter's ``scale.to(q.dtype)``) open nothing:
    graphs without a closed region are converted exactly as before.

    Args:
        graph: the FP32 ``onnx.GraphProto`` (nodes in topological order, as ONNX requires).
        elem: element type of every tensor (shape inference, initializers and constants).
    """
    from onnx import TensorProto

    FLOAT = TensorProto.FLOAT
    values = {i.name for i in graph.input} - {i.name for i in graph.initializer}  # depend on the inputs' values
    producer: dict[str, Any] = {}  # region tensor -> the opening cast or region node computing it
    opening, closing = set(), set()
    for n in graph.node:
        ins = [i for i in n.input if i]
        if n.op_type not in _SHAPE_OPS and any(i in values for i in ins):
            values.update(n.output)
        if n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            if to == FLOAT and ins and elem.get(ins[0]) == FLOAT and ins[0] in values:
                if ins[0] in producer:
                    closing.add(n.name)
                else:
                    opening.add(n.name)
                    producer.update({o: n for o in n.output if elem.get(o) == FLOAT})
            continue
        if not any(i in producer for i in ins):
            continue
        if n.op_type in _NUMERIC_USERS and any(elem.get(i) == FLOAT and i not in values for i in ins):
            continue  # a layer with weights (or a Q/DQ): the region ends at its input
        producer.update({o: n for o in n.output})
    # keep what lies on a path from an opening cast to a closing one
    kept: set[str] = set()
    stack = [n.input[0] for n in graph.node if n.name in closing]
    while stack:
        p = producer.get(stack.pop())
        if p is not None and p.name not in kept:
            kept.add(p.name)
            stack.extend(i for i in p.input if i in producer)
    return opening & kept, kept - opening, closing


def convert_to_fp16(
    model: Any, keep_fp32: Sequence[str] = (), keep_io_types: bool = True
) -> tuple[Any, FP16Conversion]:
    """Return a copy of ``model`` (an ``onnx.ModelProto``) computing in FP16, and what was done.

    Args:
        model: the FP32 graph (with or without Q/DQ).
        keep_fp32: module names whose nodes stay FP32 (nodes are matched by the TorchScript exporter's
            scope names, see :func:`~qatsparse.export.graph.module_name_of_node`).
        keep_io_types: keep FP32 graph inputs/outputs (casts at the I/O) instead of FP16 ones.

    Raises:
        NotImplementedError: the graph has control flow (If/Loop/Scan subgraphs).

    Example:
        >>> import onnx
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
        >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [w])
        >>> m, info = convert_to_fp16(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))
        >>> [n.op_type for n in m.graph.node], info.casts_added
        (['Cast', 'MatMul', 'Cast'], 2)
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qatsparse.export.onnx import module_name_of_node, nodes_of_modules
    from qatsparse.export.rewrites import raise_underflowing_bounds, sink_transposes_below_matmuls

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    conv = FP16Conversion()
    model = copy.deepcopy(model)
    moved = sink_transposes_below_matmuls(model)
    if moved:
        conv.notes.append(
            f"{moved} Transpose(s) moved below their MatMul (same values; avoids an ONNX Runtime crash on FP16 "
            "Transpose->MatMul, see qatsparse.export.rewrites)"
        )
    raised = raise_underflowing_bounds(model)
    if raised:
        conv.notes.append(
            f"{len(raised)} Clip/Max lower bound(s) below the smallest FP16 raised to it (F.normalize's 1e-12 would "
            "flush to 0 and turn a zero vector into NaN, see qatsparse.export.rewrites)"
        )
    opset = _opset(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    for n in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise NotImplementedError(f"FP16 conversion of control flow is not supported: {n.name!r} ({n.op_type})")

    elem: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        if vi.type.HasField("tensor_type"):
            elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name: i for i in graph.initializer}
    for name, t in inits.items():
        elem[name] = t.data_type
    consts: dict[str, Any] = dict(inits)  # name -> TensorProto (initializers and Constant values)
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
                    elem[n.output[0]] = a.t.data_type

    kept, missing = nodes_of_modules(graph, list(keep_fp32))
    conv.missing_modules = missing
    opening, explicit, closing = explicit_fp32_nodes(graph, elem)
    opening -= kept
    explicit -= kept
    if explicit or opening:
        conv.explicit_fp32_nodes = [n.name for n in graph.node if n.name in explicit or n.name in opening]
        modules = sorted({module_name_of_node(n) or n for n in conv.explicit_fp32_nodes})
        conv.notes.append(
            f"{len(conv.explicit_fp32_nodes)} node(s) kept in FP32 where the model casts to float32 itself "
            f"(x.float()): {', '.join(modules[:8])}{', ...' if len(modules) > 8 else ''}"
        )
    kept = kept | explicit

    def schema_of(n: Any) -> Any | None:
        try:
            return onnx.defs.get_schema(n.op_type, opset, n.domain or "")
        except Exception:
            return None

    def runs_fp16(n: Any) -> bool:
        return n.name not in kept and n.domain in ("", "ai.onnx") and schema_of(n) is not None

    # 1. the type every consumer wants for each of its float inputs (independent of the producers)
    wants: dict[tuple[int, int], int] = {}
    for k, n in enumerate(graph.node):
        schema = schema_of(n) if runs_fp16(n) else None
        for i, name in enumerate(n.input):
            if not name or elem.get(name) != FLOAT or n.name in opening or n.name in closing:
                continue  # the model's own casts read their input as it is
            p = _param(schema.inputs, i) if schema is not None else None
            ok = p is not None and "tensor(float16)" in _allowed_types(schema, p)
            wants[(k, i)] = HALF if ok else FLOAT

    # 2. constants: convert in place when every consumer wants FP16, add an FP16 copy when some do
    consumers: dict[str, list[int]] = {}
    for (k, i), t in wants.items():
        consumers.setdefault(graph.node[k].input[i], []).append(t)
    scale_names = {n.input[1] for n in graph.node if n.op_type in _QDQ and len(n.input) > 1}
    cur: dict[str, int] = {}  # current type of every float tensor
    renamed_const: dict[str, str] = {}
    new_inits = []
    graph_outputs = {o.name for o in graph.output}
    for name, t in consts.items():
        if t.data_type != FLOAT:
            continue
        ts = consumers.get(name, [])
        if ts and all(x == HALF for x in ts) and name not in graph_outputs:
            arr = _to_fp16_array(numpy_helper.to_array(t), name in scale_names, name, conv)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
            cur[name] = HALF
        else:
            cur[name] = FLOAT
            if HALF in ts:
                arr = _to_fp16_array(numpy_helper.to_array(t), name in scale_names, name, conv)
                renamed_const[name] = f"{name}__fp16"
                cur[renamed_const[name]] = HALF
                new_inits.append(numpy_helper.from_array(arr, renamed_const[name]))

    # 3. walk the nodes in order: insert casts where the producer's type differs from the wanted one
    for vi in graph.input:
        if elem.get(vi.name) == FLOAT and vi.name not in inits:
            cur[vi.name] = FLOAT
            if not keep_io_types:
                vi.type.tensor_type.elem_type = HALF
                cur[vi.name] = HALF
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []

    def cast_to(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to == HALF else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=out))
            conv.casts_added += 1
            casts[key] = out
            cur[out] = to
        return casts[key]

    for k, n in enumerate(graph.node):
        fp16 = runs_fp16(n)
        if n.name in kept and n.name not in explicit:
            conv.kept_fp32_nodes.append(n.name)
        for i, name in enumerate(n.input):
            want = wants.get((k, i))
            if want is None:
                continue
            have = cur.get(name, FLOAT)
            if want == have:
                continue
            if want == HALF and name in renamed_const:
                n.input[i] = renamed_const[name]
            else:
                n.input[i] = cast_to(name, want)
        if n.name in opening:  # the model's x.float(): casts its (FP16) input to FP32
            cur.update({o: FLOAT for o in n.output if elem.get(o) == FLOAT})
        else:
            _retype_outputs(n, fp16, cur, elem, schema_of(n) if fp16 else None, FLOAT, HALF)
        new_nodes.append(n)

    # 4. graph outputs
    renames: dict[str, str] = {}
    for vo in graph.output:
        if elem.get(vo.name) != FLOAT:
            continue
        have, want = cur.get(vo.name, FLOAT), (FLOAT if keep_io_types else HALF)
        if have != want:
            inner = f"{vo.name}__{'fp16' if have == HALF else 'fp32'}"
            renames[vo.name] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [vo.name], to=want, name=f"{vo.name}__cast_out"))
            conv.casts_added += 1
        vo.type.tensor_type.elem_type = want
    if renames:
        for n in new_nodes:
            if n.name.endswith("__cast_out"):
                continue
            n.output[:] = [renames.get(o, o) for o in n.output]
            n.input[:] = [renames.get(i, i) for i in n.input]
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    del graph.value_info[:]
    conv.problems = _harmful_changes(graph, conv, renamed_const)
    return model, conv


def _retype_outputs(n: Any, fp16: bool, cur: dict[str, int], elem: dict[str, int], schema: Any, FLOAT: int, HALF: int):
    """Set the attributes and record the output types of a node after its inputs were retyped."""
    from onnx import numpy_helper

    float_outs = [o for o in n.output if o and elem.get(o) == FLOAT]
    if n.op_type == "Constant":  # converted (or not) with the other constants
        for a in n.attribute:
            if a.name == "value":
                for o in float_outs:
                    cur[o] = a.t.data_type
        return
    if not fp16:
        for o in float_outs:
            cur[o] = FLOAT
        return
    if n.op_type == "Cast":
        to = next(a for a in n.attribute if a.name == "to")
        if to.i == FLOAT:
            to.i = HALF
        if n.input and cur.get(n.input[0]) == to.i:
            # A cast to the type it already has (the exporter's ``x.to(q.dtype)`` of an FP32 scalar, now FP16
            # on both sides) is an Identity: ONNX Runtime 1.30's CPU cast insertion retypes such a Cast's output
            # to FP32 and then rejects the session ("Type (tensor(float)) of output arg
            # (InsertedPrecisionFreeCast_...)") when its graph optimizations are off.
            n.op_type = "Identity"
            del n.attribute[:]
        for o in float_outs:
            cur[o] = to.i
        return
    if n.op_type == "ConstantOfShape":
        for a in n.attribute:
            if a.name == "value" and a.t.data_type == FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        for o in float_outs:
            cur[o] = HALF if any(a.name == "value" for a in n.attribute) else FLOAT
        return
    # Outputs typed by a type variable follow the inputs bound to the same variable.
    bound: dict[str, int] = {}
    for i, name in enumerate(n.input):
        p = _param(schema.inputs, i)
        if name and p is not None and name in cur:
            bound.setdefault(p.type_str, cur[name])
    for j, o in enumerate(n.output):
        if o not in float_outs:
            continue
        p = _param(schema.outputs, j)
        cur[o] = bound.get(p.type_str, FLOAT) if p is not None else FLOAT
