"""ONNX export: multi-input/multi-output with dynamic batch, atomic writes, FP16 and INT8+FP16 graphs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qatsparse.export.fp16 import convert_to_fp16
from qatsparse.export.lint import lint, lint_errors
from qatsparse.export.onnx import export_onnx, fold_constants, get_metadata, record_pruned_layers
from qatsparse.pipeline import ExportSettings, export_artifacts, onnx_precision
from qatsparse.quantization import QuantConfig, calibrate, quantize_model
from qatsparse.sparsity import PRUNED_METADATA_KEY, check_2to4, compute_2to4_mask
from tests.test_export_nets import BoardData, BoardNet, trained_board_net

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _ort(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def _batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    data = BoardData(n, seed)
    return data.planes, data.side


def test_two_inputs_two_outputs_dynamic_batch_match_pytorch(tmp_path):
    net = trained_board_net()
    path = export_onnx(
        net,
        net.example_input_array,
        tmp_path / "m.onnx",
        input_names=["planes", "side"],
        output_names=["policy", "value"],
    )
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    io = [*model.graph.input, *model.graph.output]
    assert [v.name for v in io] == ["planes", "side", "policy", "value"]
    for v in io:  # a symbolic batch axis on every input and output
        assert v.type.tensor_type.shape.dim[0].dim_param == "batch", v.name
    onnx.checker.check_model(model, full_check=True)
    for n in (1, 7, 64):
        planes, side = _batch(n)
        with torch.no_grad():
            p_ref, v_ref = net(planes, side)
        p, v = _ort(path, {"planes": planes.numpy(), "side": side.numpy()})
        assert p.shape == (n, 64) and v.shape == (n, 1)
        np.testing.assert_allclose(p, p_ref.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(v, v_ref.numpy(), rtol=1e-4, atol=1e-4)


def test_default_names_from_dict_output_and_numbering(tmp_path):
    class DictOut(nn.Module):
        def forward(self, a, b):
            return {"sum": a + b, "prod": a * b}

    path = export_onnx(DictOut(), (torch.ones(2, 3), torch.ones(2, 3)), tmp_path / "d.onnx")
    g = onnx.load(str(path)).graph
    assert [i.name for i in g.input] == ["input_0", "input_1"]
    assert [o.name for o in g.output] == ["sum", "prod"]
    with pytest.raises(ValueError, match="1 input names for 2 inputs"):
        export_onnx(DictOut(), (torch.ones(2, 3), torch.ones(2, 3)), tmp_path / "e.onnx", input_names=["x"])
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_onnx(DictOut(), (torch.ones(2, 3), torch.ones(2, 3)), tmp_path / "e.onnx", opset=13)


class _Unexportable(nn.Module):
    """Runs eagerly, fails inside the exporter (while it traces, after the temporary file was opened)."""

    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("cannot be traced")
        return x * 2


def test_failed_export_leaves_no_file_and_keeps_the_previous_one(tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError, match="cannot be traced"):
        export_onnx(_Unexportable(), [torch.ones(2, 3)], target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either
    export_onnx(nn.Linear(3, 3), [torch.ones(2, 3)], target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="cannot be traced"):
        export_onnx(_Unexportable(), [torch.ones(2, 3)], target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_fp16_graph_runs_in_ort_within_fp16_tolerance_and_keeps_layers_fp32(tmp_path):
    net = trained_board_net()
    p32 = export_onnx(net, net.example_input_array, tmp_path / "m32.onnx", output_names=["policy", "value"])
    proto, info = convert_to_fp16(onnx.load(str(p32)), keep_fp32=["value_fc2"])
    onnx.checker.check_model(proto, full_check=True)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.save(proto, str(tmp_path / "m16.onnx"))
    g = proto.graph
    fp = onnx.TensorProto
    assert all(v.type.tensor_type.elem_type == fp.FLOAT for v in [*g.input, *g.output])  # casts at the I/O
    inits = {i.name: i.data_type for i in g.initializer}
    kept = [n for n in g.node if n.name in info.kept_fp32_nodes]
    assert kept and all("value_fc2" in n.name for n in kept)
    assert all(inits[i] == fp.FLOAT for n in kept for i in n.input if i in inits)  # kept layer: FP32 weights
    others = [n for n in g.node if n.op_type in ("Conv", "Gemm") and n.name not in info.kept_fp32_nodes]
    assert others and all(inits[n.input[1]] == fp.FLOAT16 for n in others)
    assert onnx_precision(tmp_path / "m16.onnx") == "fp16"
    for n in (1, 7, 64):
        planes, side = _batch(n, seed=n)
        with torch.no_grad():
            p_ref, v_ref = net(planes, side)
        p, v = _ort(tmp_path / "m16.onnx", {"input_0": planes.numpy(), "input_1": side.numpy()})
        assert p.dtype == np.float32
        scale = float(p_ref.abs().max())
        np.testing.assert_allclose(p, p_ref.numpy(), rtol=0, atol=5e-3 * max(scale, 1.0))
        np.testing.assert_allclose(v, v_ref.numpy(), rtol=0, atol=5e-3)


def _qat_board(net: BoardNet) -> BoardNet:
    q = copy.deepcopy(net)
    quantize_model(q, QuantConfig(precision="int8"))
    planes, side = _batch(64, seed=3)
    calibrate(q, [(planes, side)], lambda b: q(*b))
    return q.eval()


def test_int8_model_onnx_has_fp16_remainder_and_agrees_with_fake_quant(tmp_path):
    q = _qat_board(trained_board_net())
    notes: list[str] = []
    paths = export_artifacts(
        q, q.example_input_array, ExportSettings(dirpath=tmp_path, output_names=["policy", "value"]), notes=notes
    )
    deploy = paths["model.onnx"]
    model = onnx.load(str(deploy))
    assert model.opset_import[0].version >= 19 and any("opset 19" in n for n in notes)
    nodes = model.graph.node
    inits = {i.name: i for i in model.graph.initializer}
    qs = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dqs = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert qs and len(dqs) > len(qs)  # weights are INT8 initializers behind a DQ, activations Q -> DQ
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in dqs)  # FP16 scales -> FP16 DQ
    assert any(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in dqs if n.input[0] in inits)
    assert onnx_precision(deploy) == "int8+fp16"
    assert lint_errors(lint(deploy)) == []
    assert not [f for f in lint(deploy) if f.check == "fp32-remainder"]
    for n in (1, 7, 64):
        planes, side = _batch(n, seed=10 + n)
        with torch.no_grad():
            p_ref, v_ref = q(planes, side)
        p, v = _ort(deploy, {"input_0": planes.numpy(), "input_1": side.numpy()})
        cos = float(torch.nn.functional.cosine_similarity(torch.from_numpy(p).flatten(), p_ref.flatten(), 0))
        assert cos > 0.999
        assert np.abs(v - v_ref.numpy()).max() < 0.05
        if n == 64:
            assert (p.argmax(1) == p_ref.numpy().argmax(1)).mean() >= 0.9
    # model_fp32.onnx is the same network without fake quantization
    planes, side = _batch(7)
    with torch.no_grad():
        from qatsparse.quantization import remove_quantizers

        p_ref, _ = remove_quantizers(copy.deepcopy(q))(planes, side)
    p, _ = _ort(paths["model_fp32.onnx"], {"input_0": planes.numpy(), "input_1": side.numpy()})
    np.testing.assert_allclose(p, p_ref.numpy(), rtol=1e-4, atol=1e-4)


def test_fold_constants_keeps_weight_dequantize_and_scales_become_constants(tmp_path):
    q = _qat_board(trained_board_net(steps=3))
    from qatsparse.quantization import prepare_for_onnx_export

    prepare_for_onnx_export(q)
    raw = export_onnx(q, q.example_input_array, tmp_path / "raw.onnx", fold=False)
    folded = fold_constants(onnx.load(str(raw)))
    ops = [n.op_type for n in folded.graph.node]
    assert "Clip" not in ops and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    inits = {i.name for i in folded.graph.initializer}
    assert all(n.input[1] in inits for n in folded.graph.node if n.op_type.endswith("QuantizeLinear"))
    feed = {"input_0": _batch(5)[0].numpy(), "input_1": _batch(5)[1].numpy()}
    onnx.save(folded, str(tmp_path / "folded.onnx"))
    for a, b in zip(_ort(raw, feed), _ort(tmp_path / "folded.onnx", feed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_pruned_layers_recorded_and_2to4_survives_int8_weights(tmp_path):
    net = trained_board_net(steps=3)
    with torch.no_grad():
        for m in (net.trunk[3], net.policy_fc):
            m.weight.mul_(compute_2to4_mask(m.weight))
    q = _qat_board(net)
    paths = export_artifacts(
        q, q.example_input_array, ExportSettings(dirpath=tmp_path), pruned_layers=["trunk.3", "policy_fc"]
    )
    for p in paths.values():
        recorded = get_metadata(p)[PRUNED_METADATA_KEY]
        assert "trunk.3" in recorded and "policy_fc" in recorded
        assert check_2to4(p) == []
    with pytest.raises(ValueError, match="not found"):
        record_pruned_layers(paths["model.onnx"], ["no_such_layer"])


class _Branchy(nn.Module):
    """A forward whose Python branch on a tensor value the tracer freezes (TracerWarning: the trace may be wrong)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if bool(x.sum() > 0) else -self.fc(x)


def test_tracer_warnings_reach_the_user_and_only_the_exporters_own_notices_are_silenced(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(_Branchy(), [torch.ones(1, 4)], tmp_path / "b.onnx")
        export_onnx(nn.Linear(4, 2), [torch.ones(1, 4)], tmp_path / "l.onnx")
    kinds = [(w.category.__name__, str(w.message)) for w in caught]
    assert any(k == "TracerWarning" and "Converting a tensor to a Python boolean" in m for k, m in kinds), kinds
    assert not [k for k in kinds if k[0] == "DeprecationWarning"], kinds  # the legacy exporter's notices only


class _Sdpa(nn.Module):
    """timm's attention in small: the exporter's decomposition of ``F.scaled_dot_product_attention`` computes its
    scale as ``Cast(to=float)`` of ``1 / sqrt(head_dim)``, a cast to the type the value already has."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).flatten(1)


def test_fp16_graph_has_no_same_type_cast_and_opens_without_graph_optimizations(tmp_path):
    """ONNX Runtime 1.30 refused FP16 graphs with a Cast from FP16 to FP16 when its graph optimizations were off
    ("Type (tensor(float)) of output arg (InsertedPrecisionFreeCast_...)"): the conversion makes them Identity."""
    torch.manual_seed(0)
    model, x = _Sdpa().eval(), torch.randn(2, 5, 16)
    p32 = export_onnx(model, [x], tmp_path / "m32.onnx")
    assert any(n.op_type == "Cast" for n in onnx.load(str(p32)).graph.node)  # the exporter's scale casts
    proto, _ = convert_to_fp16(onnx.load(str(p32)))
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    same = [n.name for n in g.node if n.op_type == "Cast" and types.get(n.input[0]) == n.attribute[0].i]
    assert not same
    onnx.save(proto, str(tmp_path / "m16.onnx"))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(tmp_path / "m16.onnx"), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=0, atol=5e-3)


class _Normalize(nn.Module):
    """Swin V2's cosine attention in small: ``F.normalize`` of keys, some of which are all zero (padding tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.nn.functional.normalize(x * (x.abs() > 0.5), dim=-1)  # rows of zeros where |x| <= 0.5
        return k @ k.transpose(-1, -2)


def test_fp16_graph_keeps_normalize_finite_on_zero_vectors(tmp_path):
    """``F.normalize``'s epsilon (1e-12) flushed to 0 in FP16 turned a zero key into 0 / 0 = NaN (torchvision
    swin_v2_t at 64 px: cosine 0.29 against the PyTorch model); the conversion raises it to the smallest FP16."""
    model = _Normalize().eval()
    x = torch.tensor([[[0.9, -0.8, 0.7, 0.6], [0.1, 0.2, -0.3, 0.4], [1.0, 0.0, 0.0, -1.0]]])
    p32 = export_onnx(model, [x], tmp_path / "m32.onnx")
    proto, info = convert_to_fp16(onnx.load(str(p32)))
    assert any("lower bound(s) below the smallest FP16 raised" in n for n in info.notes)
    onnx.save(proto, str(tmp_path / "m16.onnx"))
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(str(tmp_path / "m16.onnx"), opts, providers=["CPUExecutionProvider"])
        (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(out, model(x).numpy(), rtol=0, atol=5e-3)


class _FloatIsland(nn.Module):
    """timm's LiteMLA in small: linear attention computed in float32 (``q.float() ... out.to(dtype)``) because
    its sums over the tokens exceed the FP16 range."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.relu(self.qkv(x)).chunk(3, dim=-1)
        dtype = v.dtype
        v = torch.nn.functional.pad(v, (0, 1), value=1.0)
        q, k, v = q.float(), k.float(), v.float()
        out = q @ (k.transpose(-1, -2) @ v)
        out = out[..., :-1] / (out[..., -1:] + 1e-15)
        return self.proj(out.to(dtype))


class _Unclosed(nn.Module):
    """A same-type cast that nothing closes (``x.type_as(v)`` after a rotary embedding, ``logits.float()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)).type_as(x) * 2).float()


def test_fp16_remainder_keeps_the_models_own_float32_region(tmp_path):
    """The model's ``x.float()`` is a same-type Cast in the FP32 graph; converting it to FP16 ran LiteMLA's
    attention in FP16 (timm efficientvit_b0: cosine 0.98 against PyTorch). Here its sums reach ~1e6, beyond
    FP16: the region must stay FP32 up to the model's cast back, and the layers around it stay FP16."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 16) * 20
    q = _FloatIsland()
    quantize_model(q, QuantConfig(precision="int8"))
    calibrate(q, [x], q)
    q.eval()
    notes: list[str] = []
    deploy = export_artifacts(q, [x[:1]], ExportSettings(dirpath=tmp_path), notes=notes)["model.onnx"]
    assert any("kept in FP32 where the model casts to float32" in n for n in notes)
    g = onnx.shape_inference.infer_shapes(onnx.load(str(deploy))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    fp = onnx.TensorProto
    island = [
        n for n in g.node
        if n.op_type in ("MatMul", "Div") and not n.name.startswith(("/qkv/", "/proj/"))
        and types[n.output[0]] != fp.INT64  # not the shape arithmetic of chunk()
    ]  # fmt: skip
    assert len(island) == 3 and all(types[n.output[0]] == fp.FLOAT for n in island)  # k^T v, q (k^T v), /
    layers = [n for n in g.node if n.name.startswith(("/qkv/", "/proj/")) and n.op_type in ("MatMul", "Add")]
    assert layers and all(types[n.output[0]] == fp.FLOAT16 for n in layers)
    with torch.no_grad():
        ref = q(x).numpy()
        q_, k, v = torch.relu(q.qkv(x)).chunk(3, dim=-1)
        assert float((q_ @ (k.transpose(-1, -2) @ v)).abs().max()) > 65504  # beyond FP16: inf, then inf / inf
    # ONNX Runtime's CPU kernels run most FP16 nodes in FP32 (its cast insertion), so it hides an FP16 overflow;
    # ONNX's reference evaluator computes every node in its declared type, as TensorRT's strongly typed build does.
    from onnx.reference import ReferenceEvaluator

    # a same-type cast that no other closes is no float32 region: converted as it always was
    p32 = export_onnx(_Unclosed().eval(), [torch.randn(2, 8)], tmp_path / "unclosed.onnx")
    assert any(n.op_type == "Cast" for n in onnx.load(str(p32)).graph.node)
    _, info = convert_to_fp16(onnx.load(str(p32)))
    assert not info.explicit_fp32_nodes and not [n for n in info.notes if "float32" in n]
    for out in (
        _ort(deploy, {"input": x.numpy()})[0],
        ReferenceEvaluator(str(deploy)).run(None, {"input": x.numpy()})[0],
    ):
        assert np.isfinite(out).all()
        cos = float(np.dot(out.ravel(), ref.ravel()) / (np.linalg.norm(out) * np.linalg.norm(ref)))
        assert cos > 0.9999
