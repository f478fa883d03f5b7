"""The walking skeleton end to end: each callback alone and the three together, under both Lightning
packages (``pytorch_lightning`` and ``lightning``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
from qatsparse.export.runners import OnnxRuntimeRunner
from qatsparse.quantization import quantizers
from qatsparse.sparsity import check_2to4, sparsity_summary
from tests.lightning_packages import PACKAGES, classes


@pytest.fixture(params=PACKAGES)
def package(request) -> str:
    return request.param


def _trainer(pl, callbacks: list, max_steps: int):
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )


def _fit(package: str, callbacks: list, max_steps: int):
    """(model, datamodule, trainer) after fitting the example model on digits with ``package``'s Trainer."""
    pl, ResidualCNN, DigitsDataModule = classes(package)
    pl.seed_everything(0)
    model, dm = ResidualCNN(widths=(16, 32)), DigitsDataModule(batch_size=64)
    trainer = _trainer(pl, callbacks, max_steps)
    trainer.fit(model, datamodule=dm)
    return model, dm, trainer


def _qdq_fed(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """DequantizeLinear feeds both inputs, from a QuantizeLinear or (weights) an INT8 initializer."""
    producers = {o: n for n in graph.node for o in n.output}
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}

    def dq_fed(name: str) -> bool:
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return False
        q = producers.get(dq.input[0])
        return dq.input[0] in int8 or (q is not None and q.op_type == "QuantizeLinear")

    return all(dq_fed(name) for name in node.input[:2])


def test_sparsity_alone_keeps_masks_through_training(package):
    model, _, _ = _fit(package, [TwoFourSparsity(start_step=5, exclude=["fc"])], max_steps=30)
    pruned = model._qatsparse_pruned
    assert len(pruned) >= 5
    assert check_2to4(model) == []
    assert check_2to4(model, layers="all") != []  # the stem (C_in=1) and fc are dense
    for name, m in model.named_modules():
        if name in pruned:  # exactly half of every pruned weight is zero: masks held for 25 steps
            assert float((m.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-6)


def test_qat_alone_calibrates_and_fake_quantizes(package):
    model, dm, _ = _fit(package, [QuantizationAwareTraining(calib_batches=2, start_step=3)], max_steps=10)
    qs = quantizers(model)
    layers = [n[: -len(".input_quantizer")] for n in qs if n.endswith(".input_quantizer")]
    assert len(layers) == 11  # every Conv2d and Linear of the model
    assert all(f"{n}.weight_quantizer" in qs for n in layers)
    assert sum(n.endswith("residual_quantizer") for n in qs) == 4  # one per residual block
    assert all(torch.isfinite(q.amax).all() for q in qs.values())
    x = dm.val_set.tensors[0][:16]
    model.eval()
    q_out = model(x)
    for q in qs.values():
        q.enabled = False
    assert not torch.allclose(q_out, model(x)), "fake quantization must change the output"


def test_export_alone_writes_artifacts_and_report(package, tmp_path: Path):
    _fit(package, [TensorRTExport(dirpath=tmp_path, max_metric_drop=0.05)], max_steps=20)
    for f in ("model.ckpt", "model_fp32.onnx", "model.onnx", "report.json", "report.md", "report.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reference"] == "pytorch_fp32"
    assert set(report["backends"]) >= {"pytorch_fp32", "onnxruntime"}
    assert report["agreement"]["onnxruntime"]["output"]["top1_agreement"] == 1.0
    assert report["passed"] is True
    if "tensorrt" not in report["backends"]:
        assert any("TensorRT" in n for n in report["notes"])


@pytest.fixture(scope="module", params=PACKAGES)
def staged_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("staged")
    model, dm, _ = _fit(
        request.param,
        [
            TwoFourSparsity(start_step=250, exclude=["fc"], permute=True),  # before QAT calibrates at 330
            QuantizationAwareTraining(precision="int8", calib_batches=4, start_step=330),
            TensorRTExport(dirpath=out, max_metric_drop=0.02),
        ],
        max_steps=400,
    )
    return model, dm, out


def test_three_callbacks_together_pass_the_gate(staged_run):
    _, _, out = staged_run
    report = json.loads((out / "report.json").read_text())
    b = report["backends"]
    assert report["passed"] is True
    assert b["pytorch_fp32"]["metrics"]["top1"] >= 0.9
    # the reference is the dense model at step 250; training on after it may only help (the gate is one-sided)
    assert b["onnxruntime"]["metrics"]["top1"] >= b["pytorch_fp32"]["metrics"]["top1"] - 0.02
    # vs the dense reference: pruning and quantization may change a few predictions
    assert report["agreement"]["onnxruntime"]["output"]["top1_agreement"] >= 0.95
    assert report["sparsity"]["weights_2to4_share"] > 0.9
    assert report["quantization"]["precision"] == "int8"
    # channel permutation before pruning: more magnitude kept, per layer and overall, in json and md
    kept, perm = report["sparsity"]["kept_magnitude"], report["sparsity"]["permutation"]
    assert kept["overall"]["permuted"] > kept["overall"]["plain"]
    assert set(kept["layers"]) == set(report["sparsity"]["pruned_layers"])
    assert all(v["permuted"] >= v["plain"] for v in kept["layers"].values())
    assert perm["groups_moved"] >= 1 and perm["max_output_difference"] < 1e-5
    assert "with channel permutation" in (out / "report.md").read_text()


def test_exported_qdq_graph_is_2to4_and_quantized_everywhere(staged_run):
    model, _, out = staged_run
    path = out / "model.onnx"
    assert check_2to4(path) == []
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert set(json.loads(meta["qatsparse.pruned_layers"])) == set(model._qatsparse_pruned)
    graph = onnx.load(str(path)).graph
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert weighted and all(_qdq_fed(graph, n) for n in weighted), "Q/DQ must feed both inputs"
    for n in graph.node:  # symmetric: every zero point is 0
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            zp = next((i for i in graph.initializer if i.name == n.input[2]), None)
            if zp is not None:
                assert not onnx.numpy_helper.to_array(zp).any()


def test_onnxruntime_agrees_with_pytorch_qat_model(staged_run):
    model, dm, out = staged_run
    runner = OnnxRuntimeRunner(out / "model.onnx")
    model = model.cpu().eval()
    x, _ = dm.val_set.tensors
    with torch.no_grad():
        torch_pred = model(x).argmax(1).numpy()
    ort_pred = runner((x,))[0].argmax(1).numpy()
    assert np.mean(torch_pred == ort_pred) >= 0.99
    assert sparsity_summary(model)["weights_2to4_share"] > 0.9
