"""Lookups over an ONNX graph, in one place: producers, consumers, constants, and weights followed back.

A weight reaches its Conv/Gemm/MatMul through a short chain of ops that keep every element where it
is up to a transposition: ``DequantizeLinear`` (INT8 weights), ``QuantizeLinear``, ``Cast`` (FP16),
``Identity`` and ``Transpose``. :meth:`OnnxGraph.trace_constant` follows such a chain back to its
initializer (or ``Constant`` node) and maps an axis of the consumed tensor to the constant's own axis;
:meth:`ConstantTrace.values` evaluates the chain, giving the weight exactly as the consumer sees it
(dequantized, transposed). :func:`weight_uses` lists the weighted nodes with their weight input and the
reduction/output axes on it. ``check_2to4``, the lint and the search for pruned weights all use these.

Example:
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(2, 4), "w")
    >>> g = helper.make_graph([helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
    ...     helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    >>> og = OnnxGraph(helper.make_model(g)); use = weight_uses(og)["mm"]
    >>> t = og.trace_constant(use.input); (t.name, t.axis_on_constant(use.in_axis), t.values().shape)
    ('w', 1, (4, 2))
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Ops between a weight constant and its consumer that keep each element (and each zero) where it is,
#: up to the axis permutation of a Transpose.
WEIGHT_PATH_OPS = frozenset({"DequantizeLinear", "QuantizeLinear", "Cast", "Identity", "Transpose"})
#: Ops whose second input is a weight when it is a constant (TensorRT runs them as GEMMs/convolutions).
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_MAX_CHAIN = 32


def attribute(node: Any, name: str, default: Any = None) -> Any:
    """The value of a node attribute, or ``default``."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class OnnxGraph:
    """Producers, consumers and constants of an ONNX model's main graph (built once, read many times).

    Example:
        >>> from onnx import TensorProto, helper
        >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        >>> OnnxGraph(helper.make_model(g)).producer["y"].name
        'r'
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph if hasattr(model, "graph") else model
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        for n in self.graph.node:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, i))
        self.outputs = {o.name for o in self.graph.output}
        self.inputs = {i.name for i in self.graph.input}
        self._protos: dict[str, Any] = {i.name: i for i in self.graph.initializer}
        for n in self.graph.node:
            if n.op_type == "Constant":
                value = next((a.t for a in n.attribute if a.name == "value"), None)
                if value is not None:
                    self._protos[n.output[0]] = value
        self._arrays: dict[str, np.ndarray] = {}

    def is_const(self, name: str) -> bool:
        return name in self._protos

    def const(self, name: str) -> np.ndarray:
        """The value of a constant (initializer or ``Constant`` node output)."""
        if name not in self._arrays:
            from onnx import numpy_helper

            self._arrays[name] = numpy_helper.to_array(self._protos[name])
        return self._arrays[name]

    def walk_back(self, name: str, through: Iterable[str]) -> tuple[str, list[Any]]:
        """Follow ``name`` back through ``through`` ops (first input each): the tensor where the walk stops (a
        constant, a graph input, or the output of an op not in ``through``) and the ops passed, consumer side first.

        Example:
            >>> from onnx import TensorProto, helper
            >>> nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
            >>> g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
            >>> end, chain = OnnxGraph(helper.make_model(g)).walk_back("y", {"Identity"})
            >>> end, [n.op_type for n in chain]
            ('r', ['Identity'])
        """
        allowed = set(through)
        chain: list[Any] = []
        for _ in range(_MAX_CHAIN):
            node = self.producer.get(name)
            if self.is_const(name) or node is None or node.op_type not in allowed or not node.input:
                break
            chain.append(node)
            name = node.input[0]
        return name, chain

    def source(self, name: str, through: Iterable[str]) -> Any | None:
        """The node producing ``name`` once ``through`` ops are looked through (None for a constant or an input)."""
        end, _ = self.walk_back(name, through)
        return self.producer.get(end)

    def trace_constant(self, name: str, through: Iterable[str] = WEIGHT_PATH_OPS) -> ConstantTrace | None:
        """Follow ``name`` back through ``through`` ops (first input each) to a constant; None if it isn't one."""
        end, chain = self.walk_back(name, through)
        return ConstantTrace(self, end, chain) if self.is_const(end) else None


@dataclass
class ConstantTrace:
    """A tensor that is a constant behind a chain of element-preserving ops.

    Attributes:
        graph: the graph.
        name: the constant's name.
        chain: the ops from the consumer back to the constant (consumer side first).
    """

    graph: OnnxGraph
    name: str
    chain: list[Any]

    @property
    def array(self) -> np.ndarray:
        """The constant itself (e.g. INT8 values behind a DequantizeLinear)."""
        return self.graph.const(self.name)

    @property
    def transposes(self) -> list[Any]:
        return [n for n in self.chain if n.op_type == "Transpose"]

    @property
    def shape(self) -> tuple[int, ...]:
        """The traced tensor's shape: the constant's, through the chain's Transposes.

        Example:
            >>> from onnx import helper, numpy_helper
            >>> w = numpy_helper.from_array(np.zeros((2, 3, 4), np.float32), "w")
            >>> g = helper.make_graph([helper.make_node("Transpose", ["w"], ["t"], perm=[2, 0, 1])], "g", [], [], [w])
            >>> OnnxGraph(helper.make_model(g)).trace_constant("t").shape
            (4, 2, 3)
        """
        shape = tuple(int(d) for d in self.array.shape)
        for t in reversed(self.transposes):  # constant side first
            perm = attribute(t, "perm") or list(reversed(range(len(shape))))
            shape = tuple(shape[p] for p in perm)
        return shape

    def axis_on_constant(self, axis: int) -> int:
        """Map an axis of the traced tensor (negative counts from the end) to the constant's axis."""
        rank = self.array.ndim
        axis %= max(rank, 1)
        for t in self.transposes:  # consumer side first: output axis a is input axis perm[a]
            perm = attribute(t, "perm")
            axis = perm[axis] if perm is not None else rank - 1 - axis
        return axis

    def values(self) -> np.ndarray:
        """The traced tensor's value as its consumer sees it (the chain evaluated, in float32)."""
        if not self.chain:
            return self.array.astype(np.float32)
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        nodes = list(reversed(self.chain))
        feeds = {i: self.graph.const(i) for n in nodes for i in n.input if i and self.graph.is_const(i)}
        target = self.chain[0].output[0]
        g = helper.make_graph(
            nodes,
            "chain",
            [
                helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                for k, v in feeds.items()
            ],
            [helper.make_tensor_value_info(target, 0, None)],
        )
        opsets = list(getattr(self.graph.model, "opset_import", [])) or [helper.make_opsetid("", 19)]
        (out,) = ReferenceEvaluator(helper.make_model(g, opset_imports=opsets)).run(None, feeds)
        return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class WeightUse:
    """A Conv/ConvTranspose/Gemm/MatMul node and the layout of its weight input.

    Attributes:
        node: the node's name.
        op_type: its op.
        input: the name of its weight (second) input.
        in_axis: the reduction (input-channel) axis on that input -- where 2:4 groups run.
        out_axis: the output-channel axis on that input.
    """

    node: str
    op_type: str
    input: str
    in_axis: int
    out_axis: int


def weight_uses(graph: OnnxGraph) -> dict[str, WeightUse]:
    """Node name -> :class:`WeightUse` for every Conv/ConvTranspose/Gemm/MatMul with a second input.

    Conv ``W`` (M, C/group, k...): in 1, out 0; ConvTranspose ``W`` (C, M/group, k...): in 0, out 1; Gemm ``B``
    (N, K) with ``transB=1``: in 1, out 0, else (K, N): in 0, out 1; MatMul ``B`` (..., K, N): in -2, out -1.
    Whether the input is a constant is not checked here (see :meth:`OnnxGraph.trace_constant`).
    """
    out: dict[str, WeightUse] = {}
    for n in graph.graph.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        if n.op_type == "Conv":
            axes = (1, 0)
        elif n.op_type == "ConvTranspose":
            axes = (0, 1)
        elif n.op_type == "Gemm":
            axes = (1, 0) if attribute(n, "transB", 0) else (0, 1)
        else:
            axes = (-2, -1)
        out[n.name] = WeightUse(n.name, n.op_type, n.input[1], *axes)
    return out


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
