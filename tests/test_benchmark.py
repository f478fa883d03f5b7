"""Benchmark: every available backend timed per batch size, CPU-only runs say so; the script runs with --quick."""

from __future__ import annotations

import json

import pytest
import torch

from qatsparse.benchmark import benchmark, format_table, time_callable
from qatsparse.examples import ResidualCNN
from qatsparse.export.onnx import export_onnx

QUICK = {"warmup_s": 0.0, "min_time_s": 0.0, "min_iters": 3, "max_time_s": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_benchmark_times_what_it_has_and_says_so(tmp_path):
    model = ResidualCNN(widths=(8, 16)).eval()
    x = torch.randn(3, 1, 8, 8)
    onnx_path = export_onnx(model, [x], tmp_path / "m.onnx")
    r = benchmark(model, [x], batch_sizes=(1, 4), onnx_path=onnx_path, **QUICK)
    rows = {(row["backend"], row["batch_size"]): row for row in r["results"]}
    assert set(rows) == {(b, n) for b in ("pytorch_fp32", "onnxruntime") for n in (1, 4)}
    for row in rows.values():
        lat = row["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"]
        assert row["throughput_per_s"] == pytest.approx(row["batch_size"] / lat["median"] * 1e3)
        assert row["iterations"] >= 3
    skipped = {s["backend"]: s["reason"] for s in r["skipped"]}
    assert set(skipped) == {"pytorch_fp16", "pytorch_qat", "tensorrt"}
    assert "TensorRT" in skipped["tensorrt"] and "qat_module" in skipped["pytorch_qat"]
    assert r["cpu_only"] and any("CPU-only" in n for n in r["notes"])
    assert r["settings"]["batch_sizes"] == [1, 4] and "torch" in r["versions"]
    json.dumps(r)  # JSON-ready
    table = format_table(r)
    assert "pytorch_fp32" in table and "onnxruntime" in table and "skipped tensorrt" in table


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown backends"):
        benchmark(torch.nn.Linear(2, 2), [torch.zeros(1, 2)], backends=("tvm",))
    with pytest.raises(ValueError, match="positive"):
        benchmark(torch.nn.Linear(2, 2), [torch.zeros(1, 2)], batch_sizes=(0,))


def test_time_callable_respects_min_iterations():
    calls = []
    times = time_callable(lambda: calls.append(1), torch.device("cpu"), warmup_s=0.0, min_time_s=0.0, min_iters=7)
    assert len(times) == 7 and len(calls) == 7 + 3  # 3 warm-up calls are never timed


def test_inference_script_quick_run(tmp_path):
    """benchmarks/inference.py --quick: digits and ResNet-50 over FP32, QAT fake-quant and ONNX Runtime."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("inference", Path(__file__).parents[1] / "benchmarks/inference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    mod.main(["--quick", "--out", str(out), "--models", "digits_residual_cnn", "--batch-sizes", "1", "2"])
    saved = json.loads(out.read_text())
    rows = saved["models"]["digits_residual_cnn"]["results"]
    assert {r["backend"] for r in rows} >= {"pytorch_fp32", "pytorch_qat", "onnxruntime"}
    assert "--quick" in saved["command"] and saved["date"]
