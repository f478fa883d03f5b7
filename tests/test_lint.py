"""The ONNX lint catches each defect of a set of deliberately broken graphs and passes the good ones."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qatsparse.export.lint import Finding, lint, lint_errors
from qatsparse.export.onnx import export_onnx
from qatsparse.quantization import QuantConfig, calibrate, prepare_for_onnx_export, quantize_model
from qatsparse.sparsity import PRUNED_METADATA_KEY

C_IN, C_OUT = 8, 16
WHY = ("accuracy", "speed", "time", "slower", "fails", "fuse", "rounding", "kernel")


def _arr(x, dtype=np.float32):
    return np.asarray(x, dtype=dtype)


def qdq_conv(
    *,
    act_zp=0,
    act_zp_dtype=np.int8,
    act_scale=0.05,
    w_scale_shape=(C_OUT,),
    w_axis=0,
    w_values=None,
    out_qdq=False,
    weight_qdq=True,
    act_qdq=True,
    opset=19,
    extra_nodes=(),
    metadata=None,
    scale_from_input=False,
):
    """x -> Q -> DQ -> Conv(W: int8 -> DQ) -> Relu -> y, with knobs that break one rule each."""
    rng = np.random.default_rng(0)
    w = w_values if w_values is not None else rng.integers(-127, 128, size=(C_OUT, C_IN, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(_arr(np.full(w_scale_shape, 0.01)), "w_scale"),
        numpy_helper.from_array(np.zeros(w_scale_shape, np.int8), "w_zp"),
        numpy_helper.from_array(_arr(np.zeros(C_OUT)), "b"),
        numpy_helper.from_array(np.asarray(act_zp, dtype=act_zp_dtype), "x_zp"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C_IN, 8, 8])]
    nodes = []
    if scale_from_input:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
        nodes.append(helper.make_node("Abs", ["s"], ["x_scale"], name="scale_abs"))
    else:
        inits.append(numpy_helper.from_array(_arr(act_scale), "x_scale"))
    x_in = "x"
    if act_qdq:
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
        ]
        x_in = "x_dq"
    if weight_qdq:
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_DQ", axis=w_axis))
    else:
        inits[0] = numpy_helper.from_array(w.astype(np.float32) * 0.01, "w")
    nodes.append(helper.make_node("Conv", [x_in, "w", "b"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]))
    last = "c"
    if out_qdq:
        inits.append(numpy_helper.from_array(_arr(0.1), "c_scale"))
        nodes += [
            helper.make_node("QuantizeLinear", ["c", "c_scale", "x_zp"], ["c_q"], name="c_Q"),
            helper.make_node("DequantizeLinear", ["c_q", "c_scale", "x_zp"], ["c_dq"], name="c_DQ"),
        ]
        last = "c_dq"
    nodes.append(helper.make_node("Relu", [last], ["r"], name="/relu/Relu"))
    last = "r"
    for make in extra_nodes:
        new_nodes, new_inits, last = make(last)
        nodes += new_nodes
        inits += new_inits
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["n", C_OUT, 8, 8])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    return model


def _save(model, tmp_path, name="m.onnx"):
    p = tmp_path / name
    onnx.save(model, str(p))
    return p


def _checks(findings: list[Finding]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in findings:
        out.setdefault(f.check, set()).add(f.node)
    return out


def test_good_qdq_graph_passes(tmp_path):
    model = qdq_conv()
    onnx.checker.check_model(model, full_check=True)
    p = _save(model, tmp_path)
    assert [f for f in lint(p) if f.check != "fp32-remainder"] == []


def _dangling(last):
    inits = [numpy_helper.from_array(_arr(0.1), "d_scale"), numpy_helper.from_array(np.int8(0), "d_zp")]
    nodes = [
        helper.make_node("QuantizeLinear", [last, "d_scale", "d_zp"], ["d_q"], name="dangling_Q"),
        helper.make_node("DequantizeLinear", ["d_q", "d_scale", "d_zp"], ["d_dq"], name="dangling_DQ"),
        helper.make_node("Sigmoid", ["d_dq"], ["sig"], name="/head/Sigmoid"),
    ]
    return nodes, inits, "sig"


def _orphan_q(last):
    inits = [numpy_helper.from_array(_arr(0.1), "o_scale"), numpy_helper.from_array(np.int8(0), "o_zp")]
    nodes = [
        helper.make_node("QuantizeLinear", [last, "o_scale", "o_zp"], ["o_q"], name="orphan_Q"),
        helper.make_node("Cast", ["o_q"], ["o_f"], to=TensorProto.FLOAT, name="/cast/Cast"),
    ]
    return nodes, inits, "o_f"


def _unsupported(last):
    return [helper.make_node("Unique", [last], ["u"], name="/uniq/Unique")], [], "u"


def _custom(last):
    return [helper.make_node("MyPlugin", [last], ["p"], name="/plug/MyPlugin", domain="com.example")], [], "p"


CASES = [
    # (id, model kwargs, expected check, expected node)
    ("nonzero zero-point", {"act_zp": 3}, "qdq-asymmetric", "x_Q"),
    ("uint8 zero-point", {"act_zp": 128, "act_zp_dtype": np.uint8}, "qdq-asymmetric", "x_Q"),
    ("per-tensor weight scale", {"w_scale_shape": ()}, "weight-per-tensor", "w_DQ"),
    ("weight scale on the input axis", {"w_scale_shape": (C_IN,), "w_axis": 1}, "weight-axis", "w_DQ"),
    ("per-channel activation scale", {"act_scale": np.full(C_IN, 0.05)}, "activation-per-channel", "x_DQ"),
    ("Q/DQ on the conv output", {"out_qdq": True}, "qdq-on-output", "c_Q"),
    ("negative scale", {"act_scale": -0.05}, "qdq-scale-nonpositive", "x_Q"),
    ("scale computed at run time", {"scale_from_input": True}, "qdq-scale-not-constant", "x_Q"),
    ("weight without Q/DQ", {"weight_qdq": False}, "qdq-missing-input", "/conv/Conv"),
    ("dangling Q/DQ pair", {"extra_nodes": [_dangling]}, "qdq-dangling", "dangling_DQ"),
    ("Q without DQ", {"extra_nodes": [_orphan_q]}, "qdq-orphan", "orphan_Q"),
    ("op TensorRT cannot parse", {"extra_nodes": [_unsupported]}, "unsupported-op", "/uniq/Unique"),
    ("custom-domain op", {"extra_nodes": [_custom]}, "unsupported-op", "/plug/MyPlugin"),
    ("opset too old for TensorRT", {"opset": 8, "act_qdq": False, "weight_qdq": False}, "opset", "<graph>"),
    ("opset newer than TensorRT 11", {"opset": 26, "act_qdq": False, "weight_qdq": False}, "opset", "<graph>"),
]


@pytest.mark.parametrize(("case", "kwargs", "check", "node"), CASES, ids=[c[0] for c in CASES])
def test_lint_catches_each_defect(tmp_path, case, kwargs, check, node):
    model = qdq_conv(**kwargs)
    findings = lint(_save(model, tmp_path))
    found = _checks(findings)
    assert node in found.get(check, set()), f"{case}: expected {check} on {node}, got {findings}"
    for f in findings:
        assert f.node and any(w in f.message for w in WHY), f  # names the node, says what it costs


def test_output_qdq_can_be_declared_intended(tmp_path):
    p = _save(qdq_conv(out_qdq=True), tmp_path)
    assert "qdq-on-output" in _checks(lint(p))
    assert "qdq-on-output" not in _checks(lint(p, intended_output_qdq=["c_Q"]))


def test_2to4_of_recorded_layers(tmp_path):
    dense = np.ones((C_OUT, C_IN, 3, 3), np.int8)
    sparse = dense.copy()
    sparse[:, 0::4] = 0
    sparse[:, 1::4] = 0
    meta = {PRUNED_METADATA_KEY: json.dumps({"conv": "/conv/Conv"})}
    bad = lint(_save(qdq_conv(w_values=dense, metadata=meta), tmp_path, "dense.onnx"))
    assert "/conv/Conv" in _checks(bad).get("sparsity-2to4", set())
    good = lint(_save(qdq_conv(w_values=sparse, metadata=meta), tmp_path, "sparse.onnx"))
    assert "sparsity-2to4" not in _checks(good)


def test_fp32_remainder_of_qdq_graph_is_reported(tmp_path):
    found = _checks(lint(_save(qdq_conv(), tmp_path)))
    assert "/conv/Conv" in found["fp32-remainder"]


def test_real_exports_pass(tmp_path):
    """The FP32 export and the INT8 Q/DQ export of a small residual CNN have no lint errors."""
    from qatsparse.examples import ResidualCNN

    torch.manual_seed(0)
    m = ResidualCNN(widths=(8, 16)).eval()
    x = torch.randn(8, 1, 8, 8)
    assert lint(export_onnx(m, [x], tmp_path / "fp32.onnx")) == []
    q = copy.deepcopy(m)
    quantize_model(q, QuantConfig())
    calibrate(q, [x], q)
    prepare_for_onnx_export(q)
    findings = lint(export_onnx(q, [x], tmp_path / "int8.onnx", opset=19))
    assert lint_errors(findings) == []
    assert {f.check for f in findings} <= {"fp32-remainder"}


@pytest.mark.parametrize(("opset", "severity", "needs"), [(19, None, None), (20, None, None), (21, "warning", "10.15"),
                                                      (25, "warning", "11.0")])  # fmt: skip
def test_opset_bound_depends_on_the_tensorrt_release(tmp_path, opset, severity, needs):
    """10.0's parser reads opsets up to 20, 10.15's up to 24, 11.x's up to 25: newer opsets warn with the release."""
    found = [f for f in lint(_save(qdq_conv(opset=opset), tmp_path)) if f.check == "opset"]
    assert [f.severity for f in found] == ([severity] if severity else [])
    if needs:
        assert f"needs TensorRT >= {needs}" in found[0].message


def _swish(last):
    return [helper.make_node("Swish", [last], ["s"], name="/act/Swish")], [], "s"


def test_swish_is_parsed_by_tensorrt_11_only(tmp_path):
    found = lint(_save(qdq_conv(opset=24, extra_nodes=[_swish]), tmp_path))
    assert "unsupported-op" not in _checks(found)
    assert [f.severity for f in found if f.check == "op-version" and f.node == "/act/Swish"] == ["warning"]


def _qdq_avgpool(last):
    inits = [numpy_helper.from_array(_arr(0.1), "p_scale"), numpy_helper.from_array(np.int8(0), "p_zp")]
    nodes = [
        helper.make_node("QuantizeLinear", [last, "p_scale", "p_zp"], ["p_q"], name="pool_Q"),
        helper.make_node("DequantizeLinear", ["p_q", "p_scale", "p_zp"], ["p_dq"], name="pool_DQ"),
        helper.make_node("GlobalAveragePool", ["p_dq"], ["gap"], name="/pool/GlobalAveragePool"),
    ]
    return nodes, inits, "gap"


def test_qdq_before_average_pooling_is_not_dangling(tmp_path):
    """TensorRT's average pooling is a quantizable layer: Q/DQ in front of it is used, not wasted."""
    model = qdq_conv(extra_nodes=[_qdq_avgpool])
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 1
    found = _checks(lint(_save(model, tmp_path)))
    assert "pool_DQ" not in found.get("qdq-dangling", set()) and "qdq-orphan" not in found


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        lint(tmp_path / "absent.onnx")
