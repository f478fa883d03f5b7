"""TensorRT's explicit-quantization rules as lint checks: the form of each Q/DQ pair (constant positive scales,
symmetric INT8, weight scales per output channel, activation scales per tensor) and where the pairs stand
("Working with Quantized Types" in the TensorRT developer guide)."""

from __future__ import annotations

from typing import Any

import numpy as np

from qatsparse.export.findings import Finding, node_name
from qatsparse.export.graph import WEIGHTED_OPS, OnnxGraph, attribute

#: Ops a DQ moves forward through (and a Q backward through) in TensorRT's Q/DQ propagation.
_COMMUTING = {
    "MaxPool",
    "GlobalMaxPool",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Slice",
    "Gather",
    "Split",
    "Concat",
    "Pad",
}
#: Consumers that can take a dequantized INT8 tensor into a fused INT8 kernel: the weighted ops, the residual
#: Add, and average pooling (a quantizable layer in TensorRT: it runs in INT8 between Q/DQ pairs).
_POOLS = ("AveragePool", "GlobalAveragePool")
_QUANT_CONSUMERS = {*WEIGHTED_OPS, "Add", *_POOLS}


def check_qdq_form(g: OnnxGraph) -> list[Finding]:
    """Scales constant and positive, zero-points a constant INT8 0, scale axes as TensorRT expects."""
    out = []
    for n in g.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name = node_name(n)
        scale_name = n.input[1] if len(n.input) > 1 else ""
        if not g.is_const(scale_name):
            src = g.producer.get(scale_name)
            out.append(
                Finding(
                    "qdq-scale-not-constant",
                    name,
                    "error",
                    f"scale {scale_name!r} is computed at run time (by {src.op_type if src else 'a graph input'}): "
                    "TensorRT needs build-time constant scales to fuse Q/DQ into INT8 kernels; the parser rejects "
                    "it or the layer is left unfused (fold the constants before export)",
                )
            )
            scale = None
        else:
            scale = g.const(scale_name)
            if scale.size and not np.all(scale.astype(np.float64) > 0):
                out.append(
                    Finding(
                        "qdq-scale-nonpositive",
                        name,
                        "error",
                        f"scale has {int((scale <= 0).sum())} value(s) <= 0: quantization divides by the scale, so "
                        "these channels become inf/NaN or zero -- the accuracy is lost",
                    )
                )
        zp_name = n.input[2] if len(n.input) > 2 else ""
        if zp_name:
            if g.is_const(zp_name):
                zp = g.const(zp_name)
                if zp.dtype != np.int8:
                    out.append(
                        Finding(
                            "qdq-asymmetric",
                            name,
                            "error",
                            f"zero-point type is {zp.dtype} (asymmetric {zp.dtype} quantization): TensorRT supports "
                            "only symmetric INT8 (zero-point 0, type int8): the build fails, or the layer runs "
                            "unquantized and loses the INT8 speed-up",
                        )
                    )
                elif np.any(zp != 0):
                    out.append(
                        Finding(
                            "qdq-asymmetric",
                            name,
                            "error",
                            f"zero-point is not 0 (values {np.unique(zp)[:4].tolist()}): TensorRT supports only "
                            "symmetric quantization, so the build fails; treating it as 0 would shift every value "
                            "and cost accuracy",
                        )
                    )
            else:
                out.append(
                    Finding(
                        "qdq-asymmetric",
                        name,
                        "error",
                        "zero-point is computed at run time: TensorRT needs a constant zero-point of 0 (build fails)",
                    )
                )
        out += _check_axis(g, n, scale)
    return out


def _expected_weight_axis(g: OnnxGraph, consumer: Any, via: list[Any]) -> int | None:
    """Axis of the output channels on the DQ output feeding ``consumer``'s weight input (through ``via``)."""
    if consumer.op_type == "Conv":
        axis = 0
    elif consumer.op_type == "ConvTranspose":
        axis = 1
    elif consumer.op_type == "Gemm":
        axis = 0 if attribute(consumer, "transB", 0) else 1
    elif consumer.op_type == "MatMul":
        axis = -1
    else:
        return None
    for t in reversed(via):  # map the axis back through Transposes between DQ and the consumer
        perm = attribute(t, "perm")
        if perm is None:
            return None
        axis = perm[axis % len(perm)]
    return axis


def _weight_use(g: OnnxGraph, dq: Any) -> tuple[Any, list[Any]] | None:
    """The Conv/Gemm/MatMul whose weight input this DQ feeds (through Transpose/Identity), if any."""
    name, via = dq.output[0], []
    for _ in range(4):
        cons = g.consumers.get(name, [])
        if len(cons) != 1:
            return None
        node, idx = cons[0]
        if node.op_type in WEIGHTED_OPS and idx == 1:
            return node, via
        if node.op_type not in ("Transpose", "Identity"):
            return None
        if node.op_type == "Transpose":
            via.append(node)
        name = node.output[0]
    return None


def _check_axis(g: OnnxGraph, n: Any, scale: np.ndarray | None) -> list[Finding]:
    if n.op_type != "DequantizeLinear" or scale is None:
        return []
    name = node_name(n)
    if not g.trace_constant(n.input[0]) is not None:
        if scale.size > 1:
            return [
                Finding(
                    "activation-per-channel",
                    name,
                    "error",
                    f"activation scale has {scale.size} values: TensorRT quantizes activations per tensor only; the "
                    "build fails or the layer runs unquantized (use one scale for the whole tensor)",
                )
            ]
        return []
    use = _weight_use(g, n)
    trace = g.trace_constant(n.input[0])
    if use is None or trace is None:
        return []
    consumer, via = use
    expected = _expected_weight_axis(g, consumer, via)
    shape = trace.shape  # of the DQ's input (the constant through any Transpose)
    if expected is None or not shape:
        return []
    rank = len(shape)
    channels = int(shape[expected % rank])
    if scale.size == 1:
        if channels > 1:
            return [
                Finding(
                    "weight-per-tensor",
                    name,
                    "warning",
                    f"weight of {node_name(consumer)} has one scale for all {channels} output channels: the channel "
                    "with the widest range sets the step of all, which costs accuracy; TensorRT expects per-channel "
                    f"weight scales on the output axis ({expected % rank})",
                )
            ]
        return []
    axis = attribute(n, "axis", 1)
    if axis % rank != expected % rank:
        return [
            Finding(
                "weight-axis",
                name,
                "error",
                f"per-channel weight scale of {node_name(consumer)} is along axis {axis}, but its output channels are "
                f"axis {expected % rank}: TensorRT requires output-channel scales; the build fails or the layer is "
                "not fused into an INT8 kernel (runs dequantized in higher precision)",
            )
        ]
    return []


def _reaches_quant_consumer(g: OnnxGraph, name: str, depth: int = 0) -> bool:
    if depth > 8:
        return False
    for node, _ in g.consumers.get(name, []):
        if node.op_type in _QUANT_CONSUMERS:
            return True
        if node.op_type in _COMMUTING and any(_reaches_quant_consumer(g, o, depth + 1) for o in node.output):
            return True
    return False


def check_qdq_placement(g: OnnxGraph, intended: set[str]) -> list[Finding]:
    """Orphan, dangling and output Q/DQ; weighted ops with Q/DQ on one input only (``intended``: Q nodes on
    outputs that are meant to be there)."""
    out = []
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.graph.node)
    if not has_qdq:
        return out
    for n in g.graph.node:
        name = node_name(n)
        if n.op_type == "QuantizeLinear":
            cons = g.consumers.get(n.output[0], [])
            if not cons or any(c.op_type != "DequantizeLinear" for c, _ in cons) or n.output[0] in g.outputs:
                out.append(
                    Finding(
                        "qdq-orphan",
                        name,
                        "error",
                        "QuantizeLinear without a DequantizeLinear after it: an INT8 tensor leaks into "
                        f"{[c.op_type for c, _ in cons] or 'the graph output'}; TensorRT cannot fuse the pair and the "
                        "consumer sees integers instead of values",
                    )
                )
                continue
            src = g.producer.get(n.input[0])
            if src is not None and src.op_type == "BatchNormalization":
                src = g.producer.get(src.input[0]) or src
            if src is not None and src.op_type in WEIGHTED_OPS and n.name not in intended:
                dq_cons = [c for dq, _ in cons for c, _ in g.consumers.get(dq.output[0], [])]
                feeds_weighted = dq_cons and all(c.op_type in (*WEIGHTED_OPS, *_POOLS) for c in dq_cons)
                # The residual quantizer of a block whose shortcut is a (downsample) conv: TensorRT's rule is
                # a Q/DQ on the residual input of the Add, so the add fuses into the other conv's epilogue.
                feeds_residual_add = dq_cons and all(c.op_type == "Add" for c in dq_cons)
                if not feeds_weighted and not feeds_residual_add:
                    out.append(
                        Finding(
                            "qdq-on-output",
                            name,
                            "warning",
                            f"Q/DQ on the output of {node_name(src)} ({src.op_type}) feeding "
                            f"{sorted({c.op_type for c in dq_cons})}: TensorRT must write the output in INT8 and "
                            "dequantize it again -- an extra rounding step (accuracy) and it blocks the fusion of the "
                            "following ops into the epilogue (speed); TensorRT places Q/DQ on the inputs of "
                            "Conv/Gemm, not on their outputs (list it in intended_output_qdq if this is on purpose)",
                        )
                    )
        elif n.op_type == "DequantizeLinear":
            src = g.producer.get(n.input[0])
            from_q = src is not None and src.op_type == "QuantizeLinear"
            if not from_q and not g.is_const(n.input[0]) and n.input[0] not in g.inputs:
                out.append(
                    Finding(
                        "qdq-orphan",
                        name,
                        "error",
                        f"DequantizeLinear of {src.op_type if src else n.input[0]!r} without a QuantizeLinear or INT8 "
                        "constant before it: TensorRT can't pair it to fuse INT8 kernels, and it runs as a standalone "
                        "layer",
                    )
                )
            elif not _reaches_quant_consumer(g, n.output[0]):
                cons = sorted({c.op_type for c, _ in g.consumers.get(n.output[0], [])}) or ["the graph output"]
                out.append(
                    Finding(
                        "qdq-dangling",
                        name,
                        "warning",
                        f"dequantized tensor feeds {cons}, none of which runs in INT8: TensorRT cannot fuse this "
                        "Q/DQ pair and executes a standalone quantize + dequantize -- time spent to add rounding error",
                    )
                )
    for n in g.graph.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        q = [_dequantized(g, i) for i in n.input[:2]]
        if any(q) and not all(q):
            which = "weight" if q[0] else "input"
            out.append(
                Finding(
                    "qdq-missing-input",
                    node_name(n),
                    "warning",
                    f"{n.op_type} has Q/DQ on one input only (its {which} has none): TensorRT runs it in INT8 only "
                    "when every input is quantized, so it runs in FP16/FP32 with a dequantize in front -- the Q/DQ "
                    "costs time and saves nothing",
                )
            )
    return out


def _dequantized(g: OnnxGraph, name: str) -> bool:
    """``name`` comes from a DequantizeLinear, possibly through Transpose/Identity/Reshape."""
    src = g.source(name, ("Transpose", "Identity", "Reshape"))
    return src is not None and src.op_type == "DequantizeLinear"
