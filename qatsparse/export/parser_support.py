"""What TensorRT's ONNX parser imports: its operators and opsets per release, and the check of a graph
against them.

The tables come from the ONNX-TensorRT operator support matrix (``docs/operators.md`` of onnx/onnx-tensorrt,
TensorRT 10.15; ops added later are listed in :data:`TENSORRT_OPS_SINCE` with the release that added them).
"""

from __future__ import annotations

from qatsparse.export.findings import Finding, node_name
from qatsparse.export.graph import OnnxGraph

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


def check_parser_support(g: OnnxGraph) -> list[Finding]:
    """The graph's opset and operators against what the TensorRT 10.x/11.x ONNX parsers import."""
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
                    node_name(n),
                    "error",
                    f"{n.domain}::{n.op_type} is a custom-domain op: TensorRT's ONNX parser has no importer for it "
                    "and the build fails unless a plugin of that name is registered",
                )
            )
        elif n.op_type not in TENSORRT_ONNX_OPS:
            out.append(
                Finding(
                    "unsupported-op",
                    node_name(n),
                    "error",
                    f"{n.op_type} is not supported by TensorRT's ONNX parser: the build fails "
                    "(replace it in the model or provide a plugin)",
                )
            )
        elif n.op_type in TENSORRT_OPS_SINCE:
            out.append(
                Finding(
                    "op-version",
                    node_name(n),
                    "warning",
                    f"{n.op_type} is imported by TensorRT >= {TENSORRT_OPS_SINCE[n.op_type]} only: an older TensorRT "
                    "fails to build (replace it, e.g. Swish by x * Sigmoid(x), to deploy there)",
                )
            )
    return out


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))
