"""The fast paths compute what the reference paths compute (issue 8): fake quantization and masks."""

from __future__ import annotations

import copy

import pytest
import torch

from qatsparse.examples import ResidualCNN
from qatsparse.export.onnx import export_onnx
from qatsparse.pipeline import plain_copy
from qatsparse.quantization import (
    QuantConfig,
    calibrate,
    fake_quantize_int8,
    fake_quantize_int8_aten,
    fake_quantize_int8_fusable,
    prepare_for_onnx_export,
    quantize_model,
)
from qatsparse.sparsity import apply_masks, compute_2to4_mask

CASES = [(None, False), (0, True), (1, False)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _case(dtype: torch.dtype, axis: int | None, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(16, 8, 5, 5, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_()
    n = {None: 0, 0: 16, 1: 8}[axis]
    amax = torch.rand(n, generator=g) * 4 + 0.5 if n else torch.tensor(4.0)
    return x, amax.to(device), torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("axis", "narrow"), CASES)
def test_fusable_fake_quant_is_bit_identical_to_aten(device, dtype, axis, narrow):
    for seed in range(3):  # fresh random inputs each time
        x, amax, grad = _case(dtype, axis, device, seed)
        y_ref = fake_quantize_int8_aten(x, amax, axis, narrow)
        (g_ref,) = torch.autograd.grad(y_ref, x, grad)
        y = fake_quantize_int8_fusable(x, amax, axis, narrow)
        (g,) = torch.autograd.grad(y, x, grad)
        assert y.dtype == x.dtype
        assert torch.equal(y, y_ref)
        assert torch.equal(g, g_ref)
        assert (y_ref != x).any(), "the case must actually quantize"
        assert (g_ref == 0).any() and (g_ref != 0).any(), "the case must clamp some values and pass others"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fake_quant_matches_eager_forward_and_backward(device):
    torch._dynamo.reset()
    compiled = torch.compile(fake_quantize_int8)
    for axis, narrow in CASES:
        x, amax, grad = _case(torch.float32, axis, device, seed=7)
        y_ref = fake_quantize_int8(x, amax, axis, narrow)
        (g_ref,) = torch.autograd.grad(y_ref, x, grad)
        y = compiled(x, amax, axis, narrow)
        (g,) = torch.autograd.grad(y, x, grad)
        assert torch.equal(y, y_ref)
        assert torch.equal(g, g_ref)


def _quantized_model() -> tuple[ResidualCNN, torch.Tensor]:
    torch.manual_seed(0)
    model = ResidualCNN(widths=(16, 32))
    quantize_model(model, QuantConfig())
    x = torch.randn(32, 1, 8, 8)
    calibrate(model, [x], model)
    return model.eval(), x


def test_compiled_quantized_model_agrees_and_exports_the_same_onnx(tmp_path):
    torch._dynamo.reset()
    model, x = _quantized_model()
    eager = copy.deepcopy(model)
    model.compile()
    with torch.no_grad():
        y, y_ref = model(x), eager(x)
    # Convolutions may accumulate in another order when compiled, so a value can land on the other side
    # of a rounding boundary: allow one quantization step of the output, and check the classes agree.
    assert (y.argmax(1) == y_ref.argmax(1)).float().mean() >= 0.95
    assert torch.allclose(y, y_ref, atol=0.1, rtol=0.0)
    paths = []
    for name, m in (("compiled", model), ("eager", eager)):
        qdq = plain_copy(m)
        prepare_for_onnx_export(qdq)
        paths.append(export_onnx(qdq, [x[:1]], tmp_path / f"{name}.onnx"))
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_masks_equal_weight_times_mask(device):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(32, 16, 3, 3, generator=g).to(device), torch.randn(8, 64, generator=g).to(device)]
    weights[0] = weights[0].to(memory_format=torch.channels_last)
    masks = [compute_2to4_mask(w).to(w.dtype) for w in weights]
    expected = [w * m for w, m in zip(weights, masks)]
    ptrs = [w.data_ptr() for w in weights]
    apply_masks(weights, masks)
    assert [w.data_ptr() for w in weights] == ptrs, "masks must be applied in place"
    for w, e in zip(weights, expected):
        assert torch.equal(w, e)


def test_torch_export_traces_the_aten_fake_quant_op_that_exporters_map_to_qdq():
    """torch.export counts as compiling, but must keep the ATen op (the ONNX exporters' Q/DQ) not the fusable form."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    quantize_model(model, QuantConfig())
    calibrate(model, [torch.randn(4, 8)], model)
    program = torch.export.export(model.eval(), (torch.randn(2, 8),))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("fake_quantize" in op for op in ops), ops
    assert not any("round" in op for op in ops), ops
