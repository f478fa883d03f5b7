"""`make demo`'s run, asserted against the acceptance numbers of issues 2 and 13 (about 25 s on 2 cores)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
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

    # issue 13: the TensorRT hand-off bundle, the loggers, an honest latency column
    bundle = out / "tensorrt"
    assert {"build.sh", "check.sh", "inputs.npz", "outputs_pytorch_qat.npz", "outputs_onnxruntime.npz"} <= {
        p.name for p in bundle.iterdir()
    }
    with np.load(bundle / "inputs.npz") as inputs, np.load(bundle / "outputs_onnxruntime.npz") as saved:
        again = OnnxRuntimeRunner(out / "model.onnx")((torch.from_numpy(inputs["input"]),))[0]
        np.testing.assert_array_equal(again.numpy(), saved["output"])
        assert inputs["input"].shape == (32, 1, 8, 8)  # a real validation batch
        np.testing.assert_array_equal(inputs["input"], x[:32].numpy())
    (metrics_csv,) = (out / "logs").glob("version_*/metrics.csv")
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    for backend, b in report["backends"].items():
        assert f"qatsparse/report/{backend}/top1" in rows[0]
        lat = b["latency_ms"]
        assert lat["throughput_per_s"] == pytest.approx(lat["batch_size"] * 1e3 / lat["median_per_batch"])
    final = next(r for r in rows if r["qatsparse/report/passed"])
    assert float(final["qatsparse/report/passed"]) == 1.0
    assert any(r["qatsparse/sparsity/pruned_layers"] for r in rows)
    assert any(r["qatsparse/quantization/quantized_layers"] for r in rows)
