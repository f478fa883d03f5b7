"""`make demo`'s run, asserted against issue 2's acceptance numbers (about 25 s on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch

from qatsparse.cli import run_cli
from qatsparse.export.runners import OnnxRuntimeRunner
from qatsparse.sparsity import check_2to4

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits_int8_sparse.yaml"


def test_demo_recipe_meets_the_acceptance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(RECIPE)])
    out = tmp_path / "runs" / "digits_int8_sparse"
    report = json.loads((out / "report.json").read_text())
    b = report["backends"]
    dense, ort = b["pytorch_fp32"]["metrics"]["top1"], b["onnxruntime"]["metrics"]["top1"]
    assert report["passed"] is True
    assert dense >= 0.95
    assert dense - ort <= 0.01
    # ONNX Runtime agrees with the PyTorch QAT model on >= 99 % of the validation predictions
    model = cli.model.cpu().eval()
    x = cli.datamodule.val_set.tensors[0]
    with torch.no_grad():
        qat_pred = model(x).argmax(1)
    ort_pred = OnnxRuntimeRunner(out / "model.onnx")((x,))[0].argmax(1)
    assert (qat_pred == ort_pred).float().mean() >= 0.99
    assert check_2to4(out / "model.onnx") == []
    assert report["sparsity"]["weights_2to4_share"] > 0.5
    graph = onnx.load(str(out / "model.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    int8_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    for node in (n for n in graph.node if n.op_type in ("Conv", "Gemm")):
        activation, weight = node.input[:2]
        dq = producers[activation]
        assert dq.op_type == "DequantizeLinear", (node.name, activation)
        assert producers[dq.input[0]].op_type == "QuantizeLinear", (node.name, activation)
        dq = producers[weight]  # weights are stored quantized: DequantizeLinear(INT8 initializer)
        assert dq.op_type == "DequantizeLinear", (node.name, weight)
        assert dq.input[0] in int8_weights or producers[dq.input[0]].op_type == "QuantizeLinear", node.name
