"""Lint an ONNX file for what TensorRT will do with it: Q/DQ placement and form, parser support, 2:4.

Each :class:`Finding` names the node and says why it costs speed or accuracy. The rules are TensorRT's
explicit-quantization rules ("Working with Quantized Types" in the TensorRT developer guide) and the
ONNX-TensorRT operator support matrix (``docs/operators.md`` of onnx/onnx-tensorrt, TensorRT 10.15; ops
added later are listed in :data:`TENSORRT_OPS_SINCE` with the release that added them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qatsparse.export.graph import WEIGHTED_OPS, OnnxGraph, attribute

#: Operators the ONNX-TensorRT parser imports (TensorRT 10.15 support matrix, rows marked "Y").
TENSORRT_ONNX_OPS = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
    Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
    Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
    Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose
    Trilu Unsqueeze Upsample Where Xor Swish""".split()  # noqa: SIM905 (a word list reads like the source table)
)
#: Operators whose importer is newer than TensorRT 10.0: {op: first release} (TensorRT CHANGELOG.md, "Parsers").
TENSORRT_OPS_SINCE = {"Swish": "11.0"}
#: The highest ONNX opset each TensorRT release's parser accepts (the lowest is 9 throughout): 10.0 from
#: onnx-tensorrt's docs/operators.md at release/10.0-GA ("opset 9 to opset 20"), 10.15 from the same file at
#: 10.15 ("opset 9 to opset 24"), 11.x: opset 25 (the review of the 11.x parser in issue 13). Releases in
#: between are bounded by the older entry: the lint warns rather than guesses.
TENSORRT_MAX_OPSET = {"10.0": 20, "10.15": 24, "11.0": 25}
TENSORRT_MIN_OPSET = 9

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

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One lint finding: the rule, the node, how bad, and why it costs speed or accuracy.

    Example:
        >>> Finding("unsupported-op", "/x/Foo", "error", "no importer").severity
        'error'
    """

    check: str
    node: str
    severity: Severity
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.check} {self.node}: {self.message}"


class _Graph(OnnxGraph):
    """The lint's view of the graph: :class:`~qatsparse.export.graph.OnnxGraph` plus the weight test."""

    def traces_to_const(self, name: str) -> bool:
        """A constant possibly behind Q/DQ/Cast/Identity/Transpose (how weights reach Conv/Gemm)."""
        return self.trace_constant(name) is not None


_attr = attribute


def _name(n: Any) -> str:
    return n.name or f"<{n.op_type} -> {n.output[0] if n.output else '?'}>"


def lint(path: str | Path, intended_output_qdq: Iterable[str] = (), check_sparsity: bool = True) -> list[Finding]:
    """Lint the ONNX file at ``path``; ``[]`` means nothing to report.

    Checks: Q/DQ symmetric with an INT8 zero-point of 0 and constant positive scales; weight scales
    per-channel on the output axis; activation scales per-tensor; Q/DQ on both inputs of every
    Conv/Gemm/MatMul that has one; no Q/DQ on Conv/Gemm outputs (unless the Q node is listed in
    ``intended_output_qdq``); no orphan or dangling Q/DQ; FP32 compute left in a Q/DQ graph (strongly
    typed TensorRT runs it in FP32); operators and opset the TensorRT ONNX parser supports; 2:4 sparsity
    of the layers recorded as pruned in the metadata.

    Example:
        >>> import tempfile, torch
        >>> from qatsparse.export.onnx import export_onnx
        >>> p = export_onnx(torch.nn.Linear(8, 4), [torch.zeros(1, 8)], tempfile.mkdtemp() + "/m.onnx")
        >>> lint(p)
        []
    """
    import onnx

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no ONNX file at {path}")
    model = onnx.load(str(path))
    g = _Graph(model)
    findings: list[Finding] = []
    findings += _check_ops(g)
    findings += _check_qdq_form(g)
    findings += _check_qdq_placement(g, set(intended_output_qdq))
    findings += _check_fp32_remainder(g, model)
    if check_sparsity:
        findings += _check_sparsity(path)
    return findings


def lint_errors(findings: Iterable[Finding]) -> list[Finding]:
    """The findings of severity ``"error"``."""
    return [f for f in findings if f.severity == "error"]


# ----------------------------------------------------------------------------------------------- checks
def _check_ops(g: _Graph) -> list[Finding]:
    out = []
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    newest = max(TENSORRT_MAX_OPSET.values())
    if not TENSORRT_MIN_OPSET <= opset <= newest:
        out.append(
            Finding(
                "opset",
                "<graph>",
                "error",
                f"opset {opset} is outside what any TensorRT 10.x/11.x ONNX parser accepts ({TENSORRT_MIN_OPSET}-"
                f"{newest}): the engine build fails",
            )
        )
    else:
        too_old = [v for v, hi in TENSORRT_MAX_OPSET.items() if opset > hi]
        if too_old:
            first = min((v for v, hi in TENSORRT_MAX_OPSET.items() if opset <= hi), key=_version_key)
            out.append(
                Finding(
                    "opset",
                    "<graph>",
                    "warning",
                    f"opset {opset} needs TensorRT >= {first} (TensorRT {', '.join(too_old)} parse opsets up to "
                    f"{', '.join(str(TENSORRT_MAX_OPSET[v]) for v in too_old)}): older TensorRT fails to build "
                    "(export at a lower opset to deploy there)",
                )
            )
    for n in g.graph.node:
        if n.domain not in ("", "ai.onnx"):
            out.append(
                Finding(
                    "unsupported-op",
                    _name(n),
                    "error",
                    f"{n.domain}::{n.op_type} is a custom-domain op: TensorRT's ONNX parser has no importer for it "
                    "and the build fails unless a plugin of that name is registered",
                )
            )
        elif n.op_type not in TENSORRT_ONNX_OPS:
            out.append(
                Finding(
                    "unsupported-op",
                    _name(n),
                    "error",
                    f"{n.op_type} is not supported by TensorRT's ONNX parser: the build fails "
                    "(replace it in the model or provide a plugin)",
                )
            )
        elif n.op_type in TENSORRT_OPS_SINCE:
            out.append(
                Finding(
                    "op-version",
                    _name(n),
                    "warning",
                    f"{n.op_type} is imported by TensorRT >= {TENSORRT_OPS_SINCE[n.op_type]} only: an older TensorRT "
                    "fails to build (replace it, e.g. Swish by x * Sigmoid(x), to deploy there)",
                )
            )
    return out


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _check_qdq_form(g: _Graph) -> list[Finding]:
    out = []
    for n in g.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name = _name(n)
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


def _expected_weight_axis(g: _Graph, consumer: Any, via: list[Any]) -> int | None:
    """Axis of the output channels on the DQ output feeding ``consumer``'s weight input (through ``via``)."""
    if consumer.op_type == "Conv":
        axis = 0
    elif consumer.op_type == "ConvTranspose":
        axis = 1
    elif consumer.op_type == "Gemm":
        axis = 0 if _attr(consumer, "transB", 0) else 1
    elif consumer.op_type == "MatMul":
        axis = -1
    else:
        return None
    for t in reversed(via):  # map the axis back through Transposes between DQ and the consumer
        perm = _attr(t, "perm")
        if perm is None:
            return None
        axis = perm[axis % len(perm)]
    return axis


def _weight_use(g: _Graph, dq: Any) -> tuple[Any, list[Any]] | None:
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


def _check_axis(g: _Graph, n: Any, scale: np.ndarray | None) -> list[Finding]:
    if n.op_type != "DequantizeLinear" or scale is None:
        return []
    name = _name(n)
    if not g.traces_to_const(n.input[0]):
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
                    f"weight of {_name(consumer)} has one scale for all {channels} output channels: the channel with "
                    "the widest range sets the step of all, which costs accuracy; TensorRT expects per-channel weight "
                    f"scales on the output axis ({expected % rank})",
                )
            ]
        return []
    axis = _attr(n, "axis", 1)
    if axis % rank != expected % rank:
        return [
            Finding(
                "weight-axis",
                name,
                "error",
                f"per-channel weight scale of {_name(consumer)} is along axis {axis}, but its output channels are "
                f"axis {expected % rank}: TensorRT requires output-channel scales; the build fails or the layer is "
                "not fused into an INT8 kernel (runs dequantized in higher precision)",
            )
        ]
    return []


def _reaches_quant_consumer(g: _Graph, name: str, depth: int = 0) -> bool:
    if depth > 8:
        return False
    for node, _ in g.consumers.get(name, []):
        if node.op_type in _QUANT_CONSUMERS:
            return True
        if node.op_type in _COMMUTING and any(_reaches_quant_consumer(g, o, depth + 1) for o in node.output):
            return True
    return False


def _check_qdq_placement(g: _Graph, intended: set[str]) -> list[Finding]:
    out = []
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.graph.node)
    if not has_qdq:
        return out
    for n in g.graph.node:
        name = _name(n)
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
                            f"Q/DQ on the output of {_name(src)} ({src.op_type}) feeding "
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
                    _name(n),
                    "warning",
                    f"{n.op_type} has Q/DQ on one input only (its {which} has none): TensorRT runs it in INT8 only "
                    "when every input is quantized, so it runs in FP16/FP32 with a dequantize in front -- the Q/DQ "
                    "costs time and saves nothing",
                )
            )
    return out


def _dequantized(g: _Graph, name: str) -> bool:
    """``name`` comes from a DequantizeLinear, possibly through Transpose/Identity/Reshape."""
    src = g.source(name, ("Transpose", "Identity", "Reshape"))
    return src is not None and src.op_type == "DequantizeLinear"


def _check_fp32_remainder(g: _Graph, model: Any) -> list[Finding]:
    import onnx

    if not any(n.op_type == "QuantizeLinear" for n in g.graph.node):
        return []
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return []
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*inferred.graph.value_info, *inferred.graph.output]
        if vi.type.HasField("tensor_type")
    }
    out = []
    for n in g.graph.node:
        compute = n.op_type in (*WEIGHTED_OPS, "BatchNormalization", "Add", "Mul") and n.output
        if compute and types.get(n.output[0]) == onnx.TensorProto.FLOAT:
            out.append(
                Finding(
                    "fp32-remainder",
                    _name(n),
                    "warning",
                    f"{n.op_type} computes in FP32 in a Q/DQ graph: strongly typed TensorRT (always on in 11.x) "
                    "runs it in FP32, slower than FP16 (convert the non-quantized remainder to FP16)",
                )
            )
    return out


def _check_sparsity(path: Path) -> list[Finding]:
    from qatsparse.sparsity.check import check_2to4, pruned_layers_from_metadata

    if not pruned_layers_from_metadata(path):  # nothing recorded as pruned: nothing to verify
        return []
    return [
        Finding(
            "sparsity-2to4",
            v.layer,
            "error",
            f"recorded as 2:4-pruned but {v.detail}: TensorRT only runs sparse tensor-core kernels on layers whose "
            "weights are 2:4 along the input channels, so this layer loses the sparse speed-up",
        )
        for v in check_2to4(path, layers="pruned")
    ]
