"""Placement TensorRT fuses: Q/DQ on both inputs of every quantized Conv/Gemm, none on their outputs
except the residual input of an Add; residual quantizers found without rewriting the model."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import onnx
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from qatsparse.examples.models import ResidualCNN
from qatsparse.export.onnx import export_onnx
from qatsparse.quantization import (
    QuantConfig,
    calibrate,
    prepare_for_onnx_export,
    quantize_model,
    quantizers,
    remove_quantizers,
    set_quantizers_enabled,
)


class TorchvisionNet(nn.Module):
    """Small net of torchvision's own residual blocks (identity and projection shortcuts)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = BasicBlock(16, 16)
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.b2 = Bottleneck(16, 8, stride=2, downsample=down)
        self.b3 = Bottleneck(32, 8)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.b2(self.b1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class CustomAdd(nn.Module):
    """A user block: ``a + b`` after a conv, written as the user likes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x * 2
        y = self.bn(self.conv(x))
        return torch.add(skip, y)


class NoConvAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) + x


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # not traceable
            return y + x
        return y


class TrainingDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + x if self.training else y + 2 * x


class OptionalShortcut(CustomAdd):
    """timm DLA's block: ``shortcut=None`` means "x" (torch.fx would trace it as always given)."""

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        return self.bn(self.conv(x)) + shortcut


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.custom = CustomAdd()
        self.noconv = NoConvAdd()
        self.datadep = DataDependent()
        self.traindep = TrainingDependent()
        self.optional = OptionalShortcut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.traindep(self.datadep(self.noconv(self.custom(x))))
        return self.optional(x) + self.optional(x, x * 2)


def _quantized(model: nn.Module, shape: tuple[int, ...], **cfg) -> nn.Module:
    torch.manual_seed(0)
    model.eval()
    summary = quantize_model(model, QuantConfig(**cfg))
    calibrate(model, [torch.randn(8, *shape[1:]) for _ in range(2)], model)
    model.summary = summary
    return model


def _export(model: nn.Module, shape: tuple[int, ...], tmp_path) -> onnx.GraphProto:
    q = copy.deepcopy(model)
    del q.summary
    prepare_for_onnx_export(q)
    path = export_onnx(q, [torch.zeros(shape)], tmp_path / "m.onnx")
    return onnx.load(str(path)).graph, path


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def check_trt_placement(graph: onnx.GraphProto) -> tuple[int, int]:
    """Assert TensorRT's placement rules; returns (number of Conv/Gemm, number of Adds with a DQ input)."""
    prod = _producers(graph)
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    for n in weighted:
        for i in (0, 1):
            p = prod.get(n.input[i])
            assert p is not None and p.op_type == "DequantizeLinear", (n.name, i, p and p.op_type)
            src = prod.get(p.input[0])  # weights may be stored quantized: DequantizeLinear(INT8 initializer)
            assert (src is not None and src.op_type == "QuantizeLinear") or p.input[0] in int8, (n.name, i)
    adds_with_dq = 0
    for n in graph.node:
        if n.op_type == "Add" and any(
            prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in n.input
        ):
            adds_with_dq += 1
    # none on outputs: every Q/DQ pair feeds a Conv/Gemm input or the residual input of an Add only
    for dq in (n for n in graph.node if n.op_type == "DequantizeLinear"):
        users = _consumers(graph, dq.output[0])
        assert users and all(u.op_type in ("Conv", "Gemm", "MatMul", "Add") for u in users), (
            dq.name,
            [u.op_type for u in users],
        )
    return len(weighted), adds_with_dq


def test_example_model_placement_and_onnx(tmp_path):
    shape = (1, 1, 8, 8)
    m = _quantized(ResidualCNN(), shape)
    # 4 BasicBlocks, each with one residual quantizer, found without touching the model's code
    assert sorted(m.summary.residual) == [f"stages.{s}.{b}.residual_quantizer" for s in (0, 1) for b in (0, 1)]
    graph, path = _export(m, shape, tmp_path)
    n_weighted, n_adds = check_trt_placement(graph)
    assert n_weighted == 11
    assert n_adds == sum(n.op_type == "Add" for n in graph.node) == 4
    # ORT runs the Q/DQ graph as the fake-quantized model computes it
    import onnxruntime as ort

    x = torch.randn(16, 1, 8, 8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    want = m(x).detach().numpy()
    # ORT and PyTorch accumulate convolutions in different orders, so an activation can round to the
    # neighbouring INT8 level in one engine and not the other: most rows agree to float precision, and a
    # flip moves a logit by a fraction of one activation step.
    rows_equal = np.isclose(got, want, atol=1e-4, rtol=1e-4).all(axis=1)
    assert rows_equal.mean() >= 0.8, rows_equal
    np.testing.assert_allclose(got, want, atol=5e-3, rtol=0)


def test_torchvision_blocks_placement_and_onnx(tmp_path):
    shape = (1, 3, 8, 8)
    m = _quantized(TorchvisionNet(), shape)
    assert set(m.summary.residual) == {"b1.residual_quantizer", "b2.residual_quantizer", "b3.residual_quantizer"}
    assert "(downsample)" in m.summary.residual["b2.residual_quantizer"]
    assert "(x)" in m.summary.residual["b1.residual_quantizer"]
    graph, _ = _export(m, shape, tmp_path)
    n_weighted, n_adds = check_trt_placement(graph)
    assert n_weighted == 1 + 2 + 4 + 3 + 1
    assert n_adds == sum(n.op_type == "Add" for n in graph.node) == 3


def test_generic_adds_found_and_limits_reported():
    s = quantize_model(Mixed(), QuantConfig())
    assert s.residual.keys() == {"custom.residual_quantizer"}
    assert "(mul)" in s.residual["custom.residual_quantizer"]  # `skip = x * 2`, not the conv branch
    assert "could not trace" in s.notes["datadep"]
    assert "self.training" in s.notes["traindep"]
    assert "optional argument(s) ['shortcut']" in s.notes["optional"]
    model = Mixed().eval()
    quantize_model(model, QuantConfig())
    x = torch.randn(2, 4, 8, 8)
    calibrate(model, [x], model)
    assert torch.isfinite(model(x)).all()  # the block runs with and without its optional argument
    assert "noconv" not in s.notes  # no quantized layer: nothing to search for


def test_exclude_keeps_layers_float_and_drops_their_residual_quantizer():
    model = ResidualCNN()
    s = quantize_model(model, QuantConfig(exclude=[r"stages\.0\.0\.conv2$", "^fc$"]))
    assert s.skipped == {"stages.0.0.conv2": "excluded by user", "fc": "excluded by user"}
    assert type(model.fc) is nn.Linear and type(model.stages[0][0].conv2) is nn.Conv2d
    # the add of stages.0.0 follows a float conv: no residual quantizer there
    assert "stages.0.0.residual_quantizer" not in s.residual
    assert "stages.0.1.residual_quantizer" in s.residual


def test_rewritten_forward_is_exact_and_removable():
    torch.manual_seed(0)
    float_model = TorchvisionNet().eval()
    model = copy.deepcopy(float_model)
    keys = set(float_model.state_dict())
    quantize_model(model, QuantConfig())
    set_quantizers_enabled(model, False)
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(model(x), float_model(x))
    assert isinstance(model.b1, BasicBlock) and type(model.b1) is not BasicBlock
    pickle.loads(pickle.dumps(model))  # generated classes are importable within the process
    remove_quantizers(model)
    assert type(model.b1) is BasicBlock and type(model.stem) is nn.Conv2d
    assert set(model.state_dict()) == keys
    assert torch.equal(model(x), float_model(x))


def test_quantize_model_is_deterministic_and_idempotent():
    a, b = ResidualCNN(), ResidualCNN()
    sa, sb = quantize_model(a, QuantConfig()), quantize_model(b, QuantConfig())
    assert list(quantizers(a)) == list(quantizers(b))
    assert sa.residual == sb.residual
    again = quantize_model(a, QuantConfig())
    assert again.residual.keys() == sa.residual.keys()
    assert list(quantizers(a)) == list(quantizers(b))


def test_fp16_gets_no_residual_quantizers_and_int8_residual_can_be_off():
    assert quantize_model(ResidualCNN(), QuantConfig(precision="fp16")).residual == {}
    assert quantize_model(ResidualCNN(), QuantConfig(residual=False)).residual == {}


def test_residual_quantizer_changes_the_add_input():
    m = CustomAdd().eval()
    quantize_model(m, QuantConfig())
    calibrate(m, [torch.randn(8, 4, 5, 5)], m)
    q = m.residual_quantizer
    x = torch.randn(2, 4, 5, 5)
    y = m.bn(m.conv(x))
    expected = q(x * 2) + y
    assert torch.equal(m(x), expected)
    assert not torch.equal(m(x), x * 2 + y)


def test_lightning_module_forward_is_not_rewritten():
    m = ResidualCNN()
    quantize_model(m, QuantConfig())
    assert type(m) is ResidualCNN
