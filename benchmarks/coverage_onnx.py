"""What the coverage matrix measures on an exported ``model.onnx``, independently of qatsparse's own records.

A *weighted layer* is a Conv, Gemm or MatMul node whose weight input (input 1) is static: computed from
initializers and constants only (an INT8 initializer behind DequantizeLinear, a transposed constant, a
weight computed from parameters such as weight standardization). Its weight is evaluated as the node
consumes it (ONNX's reference implementation runs the static producers), so nothing qatsparse wrote
into the metadata is trusted.

* **2:4**: every group of 4 consecutive weights along the reduction axis (Conv ``W`` axis 1, Gemm ``B``
  axis 1 with ``transB`` else 0, MatMul ``B`` axis 0) holds at least 2 zeros.
* **Eligible** (TensorRT could run it with sparse kernels): Conv with ``group=1``, Gemm, or MatMul with a
  2-D weight, with output channels a multiple of 8 and reduction length a multiple of 16 -- the shape
  rule of apex ASP / ModelOpt sparsity that qatsparse also applies. Grouped and depthwise convs, batched
  (3-D) weights and odd widths are not eligible, so such models show a low eligible share, not a failure.
* **Fed by Q/DQ**: the activation input comes from a DequantizeLinear and the weight from a
  DequantizeLinear (layout ops -- Transpose, Reshape, Cast, Identity, Squeeze, Unsqueeze -- allowed in
  between, as TensorRT moves Q/DQ across them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze"})
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"})


@dataclass
class WeightedLayer:
    """One weighted node of the graph and what the matrix found about it.

    Example:
        >>> WeightedLayer("/fc/Gemm", "Gemm", (10, 64), 640, False, "C_out=10", False, True, True).params
        640
    """

    node: str
    op: str
    shape: tuple[int, ...]  #: the weight as the node consumes it
    params: int
    eligible: bool
    why_not_eligible: str
    is_2to4: bool
    qdq_input: bool
    qdq_weight: bool

    @property
    def qdq_fed(self) -> bool:
        return self.qdq_input and self.qdq_weight


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Graph:
    """Producers, static tensors and on-demand evaluation of static tensors of one ONNX graph."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.initializers = {i.name: i for i in self.graph.initializer}
        self._numpy = numpy_helper
        static = set(self.initializers) | {""}
        for n in self.graph.node:  # ONNX nodes are topologically sorted
            if n.op_type in _NONDETERMINISTIC:
                continue
            if n.op_type == "Constant" or all(i in static for i in n.input):
                static.update(o for o in n.output if o)
        self.static = static

    def value(self, name: str, cache: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The value of a static tensor (its producers evaluated with ONNX's reference implementation)."""
        cache = {} if cache is None else cache
        if name in cache:
            return cache[name]
        if name in self.initializers:
            arr = self._numpy.to_array(self.initializers[name])
        else:
            node = self.producer[name]
            if node.op_type == "Constant":
                arr = self._numpy.to_array(_attr(node, "value", None))
            elif node.op_type == "Identity":
                arr = self.value(node.input[0], cache)
            else:
                arr = self._run(node, [self.value(i, cache) if i else None for i in node.input])[
                    list(node.output).index(name)
                ]
        cache[name] = np.asarray(arr)
        return cache[name]

    def _run(self, node: Any, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
        import onnx
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        names = [i for i in node.input if i]
        arrays = [a for a in inputs if a is not None]
        g = helper.make_graph(
            [node],
            "static",
            [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
                for n, a in zip(names, arrays)
            ],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
        )
        opsets = list(self.model.opset_import)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):  # the reference implements these from opset 19
            opsets = [
                helper.make_opsetid(o.domain, max(o.version, 19)) if o.domain in ("", "ai.onnx") else o for o in opsets
            ]
        model = helper.make_model(g, opset_imports=opsets)
        return ReferenceEvaluator(model).run(None, dict(zip(names, arrays)))

    def comes_from(self, name: str, op_type: str) -> bool:
        """True when ``name`` is produced by ``op_type``, possibly through layout ops."""
        for _ in range(16):
            node = self.producer.get(name)
            if node is None:
                return False
            if node.op_type == op_type:
                return True
            if node.op_type not in LAYOUT_OPS:
                return False
            name = node.input[0]
        return False


def _reduction_axis(node: Any, w: np.ndarray) -> int:
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if _attr(node, "transB", 0) else 0
    return w.ndim - 2 if w.ndim >= 2 else 0  # MatMul B: (..., K, N)


def is_2to4_along(w: np.ndarray, axis: int) -> bool:
    """True when every group of 4 consecutive elements along ``axis`` holds at least 2 zeros.

    Example:
        >>> is_2to4_along(np.array([[1.0, 0.0, 0.0, 2.0], [0.0, 3.0, 4.0, 0.0]]), 1)
        True
        >>> is_2to4_along(np.array([[1.0, 1.0, 0.0, 2.0]]), 1)
        False
    """
    if w.ndim == 0 or w.shape[axis] % 4:
        return False
    groups = np.moveaxis(w != 0, axis, -1).reshape(-1, 4)
    return bool((groups.sum(1) <= 2).all())


def eligibility(node: Any, w: np.ndarray) -> str:
    """Why TensorRT could not run this layer with sparse kernels; ``""`` when it could."""
    if node.op_type == "Conv":
        group = _attr(node, "group", 1)
        if group != 1:
            return "depthwise conv" if w.shape[1] == 1 else f"grouped conv (group={group})"
        c_out, c_in = w.shape[0], w.shape[1]
    elif node.op_type == "Gemm":
        c_out, c_in = (w.shape[0], w.shape[1]) if _attr(node, "transB", 0) else (w.shape[1], w.shape[0])
    else:
        if w.ndim != 2:
            return f"MatMul weight of rank {w.ndim}"
        c_in, c_out = w.shape
    problems = []
    if c_out % 8:
        problems.append(f"C_out={c_out} not a multiple of 8")
    if c_in % 16:
        problems.append(f"C_in={c_in} not a multiple of 16")
    return ", ".join(problems)


def weighted_layers(path: str | Path) -> list[WeightedLayer]:
    """Every weighted layer of the ONNX file at ``path`` (see the module docstring)."""
    import onnx

    g = _Graph(onnx.load(str(path)))
    out = []
    for node in g.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in g.static:
            continue
        w = g.value(node.input[1])
        why = eligibility(node, w)
        out.append(
            WeightedLayer(
                node=node.name,
                op=node.op_type,
                shape=tuple(int(d) for d in w.shape),
                params=int(w.size),
                eligible=not why,
                why_not_eligible=why,
                is_2to4=is_2to4_along(w, _reduction_axis(node, w)),
                qdq_input=g.comes_from(node.input[0], "DequantizeLinear"),
                qdq_weight=g.comes_from(node.input[1], "DequantizeLinear"),
            )
        )
    return out


def summarize(layers: list[WeightedLayer], listed: int = 8) -> dict[str, Any]:
    """Shares over the weighted layers, and the eligible layers that are not 2:4 (the first ``listed``).

    Example:
        >>> rows = [WeightedLayer("a", "Conv", (16, 16, 1, 1), 256, True, "", True, True, True),
        ...         WeightedLayer("b", "Gemm", (10, 16), 160, False, "C_out=10 not a multiple of 8", False, True, True)]
        >>> s = summarize(rows); s["share_2to4"], s["eligible_share"], s["all_eligible_2to4"]
        (0.6153846153846154, 0.6153846153846154, True)
    """
    from qatsparse.export.onnx import module_name_of_node

    total = sum(r.params for r in layers)
    eligible = [r for r in layers if r.eligible]
    missed = [r for r in eligible if not r.is_2to4]

    def share(rows: list[WeightedLayer]) -> float | None:
        return sum(r.params for r in rows) / total if total else None

    return {
        "weighted_layers": len(layers),
        "weight_params": total,
        "share_2to4": share([r for r in layers if r.is_2to4]),
        "eligible_share": share(eligible),
        "eligible_layers": len(eligible),
        "eligible_not_2to4": len(missed),
        "eligible_not_2to4_share": share(missed),
        "eligible_not_2to4_examples": [
            f"{module_name_of_node(r.node) or r.node} ({r.op} {'x'.join(map(str, r.shape))})" for r in missed[:listed]
        ],
        "all_eligible_2to4": not missed,
        "qdq_fed_layers": sum(r.qdq_fed for r in layers),
        "qdq_fed_share": sum(r.qdq_fed for r in layers) / len(layers) if layers else None,
        "qdq_input_only": sum(r.qdq_input and not r.qdq_weight for r in layers),
    }


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Cosine similarity (flattened), top-1 agreement (rows of 2-D logits) and max abs difference of ``a``
    against ``b``; non-finite values make the cosine NaN.

    Example:
        >>> agreement(np.array([[1.0, 2.0]]), np.array([[1.0, 2.0]]))["top1_agreement"]
        1.0
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    if not finite:
        cos = float("nan")
    elif denom > 0:
        cos = float(a.ravel() @ b.ravel()) / denom
    else:  # both zero: identical; one zero: no agreement
        cos = 1.0 if not a.any() and not b.any() else 0.0
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return {
        "cosine": cos,
        "top1_agreement": float((a2.argmax(1) == b2.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(a - b).max()) if finite else float("nan"),
        "finite": finite,
    }


def as_dicts(layers: list[WeightedLayer]) -> list[Mapping[str, Any]]:
    return [asdict(r) for r in layers]
