"""TensorRT: the pure parsers (build log, inspector JSON of 10.x and 11.x) everywhere; builds where TensorRT is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from qatsparse.export.tensorrt import (
    normalize_dtype,
    parse_engine_information,
    parse_sparsity_log,
    profile_shapes,
    tensorrt_available,
    uses_strong_typing,
)

# Shaped like TensorRT 10.x output (ProfilingVerbosity.DETAILED): combined "Format/Datatype", "Bindings".
INSPECTOR_10 = {
    "Layers": [
        {
            "Name": "/stem/Conv + /stem/Relu",
            "LayerType": "CaskConvolution",
            "Inputs": [
                {
                    "Name": "input",
                    "Location": "Device",
                    "Dimensions": [32, 1, 8, 8],
                    "Format/Datatype": "Four wide channel vectorized row major Int8 format",
                }
            ],
            "Outputs": [
                {
                    "Name": "/stem/Relu_output_0",
                    "Location": "Device",
                    "Dimensions": [32, 32, 8, 8],
                    "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format",
                }
            ],
            "ParameterType": "Convolution",
            "Weights": {"Type": "Int8", "Count": 288},
            "HasSparseWeights": 0,
            "TacticName": "sm90_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32",
        },
        {
            "Name": "/layer1/conv2/Conv",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "a", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
            "Outputs": [{"Name": "b", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "Weights": {"Type": "Int8", "Count": 9216},
            "HasSparseWeights": 1,
            "TacticName": "sm90_xmma_fprop_sparse_conv_interleaved_i8i8_f16f32",
        },
        {
            "Name": "/fc/Gemm",
            "LayerType": "CaskGemmMatrixMultiply",
            "Inputs": [{"Name": "c", "Format/Datatype": "Row major linear FP16 format"}],
            "Outputs": [{"Name": "output", "Format/Datatype": "Row major linear FP32"}],
            "HasSparseWeights": 0,
        },
        {
            "Name": "Reformatting CopyNode for Output Tensor 0",
            "LayerType": "Reformat",
            "Inputs": [{"Name": "d", "Format/Datatype": "Half"}],
            "Outputs": [{"Name": "e", "Format/Datatype": "Float"}],
        },
    ],
    "Bindings": ["input", "output"],
}

# Shaped like TensorRT 11.x output: separate "Datatype"/"Format", "I/O Tensors" objects.
INSPECTOR_11 = {
    "Layers": [
        {
            "Name": "/stem/Conv",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "input", "Dimensions": [-1, 1, 8, 8], "Format": "kCHW32", "Datatype": "Int8"}],
            "Outputs": [{"Name": "s", "Dimensions": [-1, 32, 8, 8], "Format": "kCHW32", "Datatype": "Int8"}],
            "HasSparseWeights": 1,
            "TacticName": "sm100_sparse_i8",
        },
        {
            "Name": "/head/MatMul",
            "LayerType": "MatrixMultiply",
            "Inputs": [{"Name": "s", "Format": "kLINEAR", "DataType": "FP16"}],
            "Outputs": [{"Name": "output", "Format": "kLINEAR", "DataType": "FP16"}],
        },
    ],
    "I/O Tensors": [
        {"Name": "input", "IOMode": "INPUT", "Datatype": "FP32", "Dimensions": [-1, 1, 8, 8]},
        {"Name": "output", "IOMode": "OUTPUT", "Datatype": "FP32", "Dimensions": [-1, 10]},
    ],
}

BUILD_LOG = [
    "[03/14/2026-10:00:00] [TRT] [I] Global timing cache in use.",
    "[03/14/2026-10:00:01] [TRT] [I] (Sparsity) Layers eligible for sparse math: /layer1/conv1/Conv + /layer1/relu/Relu"
    ", /layer1/conv2/Conv, /stem/Conv",
    "[03/14/2026-10:00:05] [TRT] [I] (Sparsity) TRT inference plan picked sparse implementation for layers: "
    "/layer1/conv2/Conv",
    "[03/14/2026-10:00:05] [TRT] [I] (Sparsity) TRT inference plan picked sparse implementation for layers: /stem/Conv",
    "[03/14/2026-10:00:06] [TRT] [I] Engine generation completed in 6.1 seconds.",
]


def test_sparsity_log_lists_eligible_and_picked_separately():
    s = parse_sparsity_log(BUILD_LOG)
    assert s["eligible"] == ["/layer1/conv1/Conv + /layer1/relu/Relu", "/layer1/conv2/Conv", "/stem/Conv"]
    assert s["picked"] == ["/layer1/conv2/Conv", "/stem/Conv"]
    assert parse_sparsity_log(["[I] nothing about sparsity"]) == {"eligible": [], "picked": []}


def test_inspector_json_of_tensorrt_10():
    r = parse_engine_information(json.dumps(INSPECTOR_10))
    assert r["schema"] == "10.x"
    assert [t["name"] for t in r["io_tensors"]] == ["input", "output"]
    prec = {layer["name"]: layer["precision"] for layer in r["layers"]}
    assert prec == {
        "/stem/Conv + /stem/Relu": "int8",
        "/layer1/conv2/Conv": "int8",
        "/fc/Gemm": "fp32",
        "Reformatting CopyNode for Output Tensor 0": "fp32",
    }
    assert r["sparse_layers"] == ["/layer1/conv2/Conv"]
    assert r["precision_counts"] == {"int8": 2, "fp32": 2}
    assert r["layers"][1]["tactic"].startswith("sm90_xmma_fprop_sparse")


def test_inspector_json_of_tensorrt_11():
    r = parse_engine_information(INSPECTOR_11)
    assert r["schema"] == "11.x"
    assert r["io_tensors"] == [
        {"name": "input", "mode": "INPUT", "dtype": "fp32"},
        {"name": "output", "mode": "OUTPUT", "dtype": "fp32"},
    ]
    assert [(x["name"], x["precision"], x["sparse_weights"]) for x in r["layers"]] == [
        ("/stem/Conv", "int8", True),
        ("/head/MatMul", "fp16", None),
    ]


def test_inspector_names_only_without_detailed_verbosity():
    r = parse_engine_information({"Layers": ["conv1 + relu1", "fc"], "Bindings": ["x", "y"]})
    assert [x["name"] for x in r["layers"]] == ["conv1 + relu1", "fc"]
    assert r["precision_counts"] == {"unknown": 2}


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("Row major linear FP32", "fp32"),
        ("Float", "fp32"),
        ("Half", "fp16"),
        ("Channel major FP16 format where channel % 8 == 0", "fp16"),
        ("Thirty-two wide channel vectorized row major Int8 format.", "int8"),
        ("BF16", "bf16"),
        ("Int32", "int32"),
        ("N/A due to dynamic shapes", "unknown"),
        (None, "unknown"),
    ],
)
def test_dtype_spellings(text, name):
    assert normalize_dtype(text) == name


def test_typing_mode_by_version():
    assert not uses_strong_typing("10.0.1")
    assert not uses_strong_typing("10.11.0.33")
    assert uses_strong_typing("10.12.0")
    assert uses_strong_typing("10.16.0")
    assert uses_strong_typing("11.0.0")


def test_profile_shapes_and_their_errors():
    shapes = profile_shapes({"planes": (-1, 6, 8, 8), "side": (-1, 5)}, (1, 32, 256))
    assert shapes["side"] == ((1, 5), (32, 5), (256, 5))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        profile_shapes({"x": (-1, 3)}, (8, 4, 16))
    with pytest.raises(ValueError, match="dynamic batch axis"):
        profile_shapes({"x": (4, 3)}, (1, 2, 4))
    with pytest.raises(ValueError, match="dynamic non-batch"):
        profile_shapes({"x": (-1, -1)}, (1, 2, 4))


@pytest.mark.skipif(tensorrt_available(), reason="checks the error raised where TensorRT is absent")
def test_build_engine_true_without_tensorrt_fails_before_the_first_step(tmp_path):
    from qatsparse import TensorRTExport
    from tests.test_export_nets import BoardNet, board_loader

    class Counting(BoardNet):
        steps = 0

        def training_step(self, batch, batch_idx):
            Counting.steps += 1
            return super().training_step(batch, batch_idx)

    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[TensorRTExport(dirpath=tmp_path, build_engine=True)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with pytest.raises(RuntimeError, match="build_engine=True"):
        trainer.fit(Counting(), board_loader(32, 16), board_loader(16, 16))
    assert Counting.steps == 0
    assert not (tmp_path / "model.onnx").exists()


# ------------------------------------------------------------------ with TensorRT (skipped elsewhere)
needs_trt = pytest.mark.skipif(
    not tensorrt_available(), reason="TensorRT is not importable here (needs NVIDIA's wheel and a CUDA GPU)"
)


@pytest.mark.gpu
@needs_trt
def test_build_and_run_engine_any_batch_in_profile(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    from qatsparse.export.onnx import export_onnx
    from qatsparse.export.runners import OnnxRuntimeRunner
    from qatsparse.export.tensorrt import TensorRTRunner, build_engine
    from tests.test_export_nets import BoardData, trained_board_net

    net = trained_board_net(steps=3)
    onnx_path = export_onnx(net, net.example_input_array, tmp_path / "m.onnx", output_names=["policy", "value"])
    facts = build_engine(onnx_path, tmp_path / "model.plan", (1, 16, 64), 1.0, sparse_weights=True,
                         precision="fp32", timing_cache=tmp_path / "timing.cache")  # fmt: skip
    saved = json.loads((tmp_path / "build.json").read_text())
    assert saved["tensorrt"] == trt.__version__ and saved["engine_bytes"] == (tmp_path / "model.plan").stat().st_size
    assert facts["inspector"]["layers"] and "SPARSE_WEIGHTS" in facts["builder_flags"]
    assert (tmp_path / "timing.cache").stat().st_size > 0
    runner, ort_runner = TensorRTRunner(tmp_path / "model.plan"), OnnxRuntimeRunner(onnx_path)
    for n in (1, 7, 64):
        data = BoardData(n, seed=n)
        got = runner((data.planes, data.side))
        want = ort_runner((data.planes, data.side))
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner((torch.zeros(65, 6, 8, 8), torch.zeros(65, 5)))
    fn, _ = runner.timed_callable([torch.zeros(16, 6, 8, 8).cuda(), torch.zeros(16, 5).cuda()])
    fn()
    torch.cuda.synchronize()
