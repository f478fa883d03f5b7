"""Report files of a full export + validation of a two-output INT8 model: they parse, name both outputs, PNG is real."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from qatsparse.pipeline import ExportSettings, export_and_validate, validate_artifacts
from qatsparse.quantization import QuantConfig, calibrate, quantize_model
from tests.test_export_nets import board_loader, trained_board_net

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("export")
    reference = trained_board_net(steps=6)
    final = copy.deepcopy(reference)
    quantize_model(final, QuantConfig(precision="int8"))
    loader = board_loader(64, 32)
    calibrate(final, loader, lambda b: final(*b[0]))
    settings = ExportSettings(
        dirpath=d, output_names=["policy", "value"], build_engine="auto", max_metric_drop={"policy/top1": 0.2}
    )
    report = export_and_validate(final, reference, loader, settings, console=False)
    return d, report, final, reference, loader, settings


def test_report_json_names_both_outputs_and_their_metrics(exported):
    d, report, *_ = exported
    saved = json.loads((d / "report.json").read_text())
    for key in ("reference", "backends", "agreement", "sparsity", "quantization", "passed", "versions"):
        assert key in saved
    assert saved["reference"] == "pytorch_fp32"
    assert saved["outputs"] == ["policy", "value"]
    assert set(saved["backends"]) == {"pytorch_fp32", "pytorch_qat", "onnxruntime"}  # no TensorRT here
    for b in saved["backends"].values():
        assert set(b["metrics"]) == {"policy/top1", "value/mse"}
        assert b["latency_ms"]["median_per_batch"] > 0
    assert saved["metrics"]["value/mse"] == {"output": "value", "higher_is_better": False}
    for backend in ("pytorch_qat", "onnxruntime"):
        assert set(saved["agreement"][backend]) == {"policy", "value"}
        assert saved["agreement"][backend]["policy"]["cosine"] > 0.99
    assert saved["backends"]["onnxruntime"]["precision"] == "int8+fp16"
    assert saved["passed"] is True and saved["gate"]["failures"] == []
    assert any("TensorRT is not importable" in n for n in saved["notes"])
    assert isinstance(saved["lint"], list) and not [f for f in saved["lint"] if f["severity"] == "error"]
    assert {"model.onnx", "model_fp32.onnx", "report.json", "report.md", "report.png"} <= set(saved["artifacts"])
    assert saved == json.loads(json.dumps(report, default=str))


def test_report_md_has_one_row_per_backend(exported):
    d, report, *_ = exported
    md = (d / "report.md").read_text()
    assert "**PASSED**" in md
    header = next(line for line in md.splitlines() if line.startswith("| backend"))
    for col in ("policy/top1", "value/mse", "drop policy/top1", "samples/s", "2:4 weight share", "precision"):
        assert col in header
    lines = md.splitlines()
    for name in report["backends"]:
        agreement = sum(line.startswith((f"| {name} | policy |", f"| {name} | value |")) for line in lines)
        assert sum(line.startswith(f"| {name} |") for line in lines) - agreement == 1
        assert agreement == (0 if name == report["reference"] else 2)
    assert "| onnxruntime | value |" in md


def test_report_png_opens_and_is_not_trivial(exported):
    d, *_ = exported
    with Image.open(d / "report.png") as im:
        im.load()
        assert im.width >= 600 and im.height >= 300
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colors = np.unique(pixels, axis=0)
    assert len(colors) > 50  # bars, text, axes -- not a blank or single-colour image
    assert (pixels != 255).any(axis=1).mean() > 0.02


def test_validate_artifacts_rewrites_the_report_and_the_gate_fails(exported):
    d, _, final, reference, loader, settings = exported
    strict = copy.copy(settings)
    strict.max_metric_drop = {"value/mse": -1.0}  # impossible bound: the gate must fail and say so
    (d / "report.md").write_text("stale")
    report = validate_artifacts(final, reference, loader, strict, console=False)
    assert report["passed"] is False and report["gate"]["failures"]
    assert "**FAILED**" in (d / "report.md").read_text()
    assert json.loads((d / "report.json").read_text())["passed"] is False
    with pytest.raises(FileNotFoundError, match="no TensorRT engine"):
        validate_artifacts(final, reference, loader, settings, engine_path=d / "model.plan", console=False)


def test_latency_and_throughput_agree_on_every_row(exported):
    """One statistic for both columns: samples/s = batch size / median ms per batch, so they rank alike."""
    from qatsparse.report import report_rows

    _, report, *_ = exported
    lats = {n: b["latency_ms"] for n, b in report["backends"].items()}
    for lat in lats.values():
        assert lat["statistic"] == "median" and lat["warmup_batches"] == 1 and lat["indicative"]  # CPU here
        assert lat["throughput_per_s"] == pytest.approx(lat["batch_size"] * 1e3 / lat["median_per_batch"])
    by_latency = sorted(lats, key=lambda n: lats[n]["median_per_batch"])
    assert by_latency == sorted(lats, key=lambda n: -lats[n]["throughput_per_s"])
    header, rows = report_rows(report)
    ms, sps = header.index("ms/batch (median)"), header.index("samples/s (same median)")
    for row in rows:
        assert row[ms].endswith("*") and row[sps].endswith("*")  # CPU latencies marked indicative
        assert float(row[sps][:-1]) == pytest.approx(32 * 1e3 / float(row[ms][:-1]), rel=2e-3)


def test_each_backends_2to4_share_is_measured_on_what_it_runs(tmp_path):
    """The ONNX Runtime row is measured on the ONNX graph: a dense graph beside a pruned module reads 0."""
    from qatsparse.export.onnx import export_onnx
    from qatsparse.export.runners import OnnxRuntimeRunner, TorchRunner
    from qatsparse.pipeline import _backend_sparsity
    from qatsparse.sparsity import prune_2to4
    from qatsparse.sparsity.check import onnx_sparsity_summary

    dense = trained_board_net(steps=2)
    pruned = copy.deepcopy(dense)
    prune_2to4(pruned)
    ex = dense.example_input_array
    dense_onnx, pruned_onnx = export_onnx(dense, ex, tmp_path / "d.onnx"), export_onnx(pruned, ex, tmp_path / "p.onnx")
    got = _backend_sparsity([TorchRunner(pruned, "pytorch_qat"), OnnxRuntimeRunner(dense_onnx, "onnxruntime")], None)
    assert got["pytorch_qat"]["weights_2to4_share"] > 0.5 and got["onnxruntime"]["weights_2to4_share"] == 0.0
    assert got["onnxruntime"]["measured_on"] == "onnx graph d.onnx"
    share = onnx_sparsity_summary(pruned_onnx)["weights_2to4_share"]
    assert share == pytest.approx(got["pytorch_qat"]["weights_2to4_share"], abs=0.02)


def test_report_figure_says_which_metric_failed_against_which_bound_and_shows_compression(exported):
    from qatsparse.report_figure import figure

    _, report, *_ = exported
    failed = copy.deepcopy(report)
    failed["passed"] = False
    failed["gate"] = {"max_metric_drop": {"value/mse": -1.0},
                      "failures": ["onnxruntime: value/mse = 0.5 vs 0.4 (drop 0.1 > allowed -1.0)"]}  # fmt: skip
    for name in ("pytorch_qat", "onnxruntime"):
        failed["backends"][name]["drop_vs_reference"]["value/mse"] = 0.1
    fig = figure(failed)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [fig._suptitle.get_text()]
    titles = [ax.get_title() for ax in fig.axes]
    assert "FAILED" in fig._suptitle.get_text() and "drop 0.1 > allowed -1.0" in fig._suptitle.get_text()
    assert any("FAILS" in t and "> -1" in t for t in texts)  # on the failing bars
    assert any("2:4 weight share" in t for t in titles)
    assert any("quantized: " in t and "int8" in t for t in texts)
