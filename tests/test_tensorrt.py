"""TensorRT: the pure parsers (build log, inspector JSON of 10.x and 11.x), profiles and timing-cache handling
everywhere; builds, the logger and the runner where TensorRT is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from qatsparse.export.engine_info import (
    engine_sparsity,
    normalize_dtype,
    parse_engine_information,
    parse_sparsity_log,
    trtexec_build_facts,
)
from qatsparse.export.profile import onnx_input_dims, profile_shapes, shape_spec
from qatsparse.export.tensorrt import attach_timing_cache, tensorrt_available

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
    assert r["sparse_weight_layers"] == ["/layer1/conv2/Conv"]
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


def test_picked_sparse_layers_come_from_the_build_log_not_the_inspector():
    inspection = parse_engine_information(INSPECTOR_10)
    known = engine_sparsity(BUILD_LOG, inspection)
    assert known["picked"] == ["/layer1/conv2/Conv", "/stem/Conv"]
    assert known["weights_qualify"] == ["/layer1/conv2/Conv"]  # HasSparseWeights: eligible, not chosen
    unseen = engine_sparsity(None, inspection)  # log swallowed by another process-wide logger
    assert unseen["picked"] is None and unseen["eligible"] is None and "unknown" in unseen["source"]


def test_trtexec_build_facts_read_the_layer_info_and_log_build_sh_leaves(tmp_path):
    assert trtexec_build_facts(tmp_path) is None
    (tmp_path / "layer_info.json").write_text(json.dumps(INSPECTOR_11))
    (tmp_path / "build.log").write_text("\n".join(BUILD_LOG))
    facts = trtexec_build_facts(tmp_path)
    assert facts["inspector"]["schema"] == "11.x"
    assert facts["sparsity"]["picked"] == ["/layer1/conv2/Conv", "/stem/Conv"]


def test_profile_shapes_from_the_graphs_dynamic_dims_and_their_errors():
    shapes = profile_shapes({"planes": ("batch", 6, 8, 8), "side": (-1, 5)}, (1, 32, 256))
    assert shapes["side"] == ((1, 5), (32, 5), (256, 5))
    seq = profile_shapes({"ids": ("batch", "seq"), "mask": ("batch", "seq")}, (1, 8, 16), {"seq": (4, 64, 128)})
    assert seq["ids"] == seq["mask"] == ((1, 4), (8, 64), (16, 128))
    notes: list[str] = []
    fixed = profile_shapes({"ids": ("batch", "seq")}, (1, 8, 16), example_shapes={"ids": (3, 40)}, notes=notes)
    assert fixed["ids"] == ((1, 40), (8, 40), (16, 40)) and "example's size 40" in notes[0]
    with pytest.raises(ValueError, match="min <= opt <= max"):
        profile_shapes({"x": ("batch", 3)}, (8, 4, 16))
    with pytest.raises(ValueError, match=r"dim_ranges=\{'seq'"):
        profile_shapes({"x": ("batch", "seq")}, (1, 2, 4))
    with pytest.raises(ValueError, match="range of dim 'seq'"):
        profile_shapes({"x": ("batch", "seq")}, (1, 2, 4), {"seq": (8, 4, 2)})
    assert shape_spec({"ids": (8, 64), "a:0": ()}) == "ids:8x64,'a:0':scalar"


def test_profile_reads_the_exported_graph(tmp_path):
    from qatsparse.export.onnx import export_onnx
    from tests.test_export_nets import BoardNet

    net = BoardNet()
    p = export_onnx(net, net.example_input_array, tmp_path / "m.onnx")
    assert onnx_input_dims(p) == {"input_0": ("batch", 6, 8, 8), "input_1": ("batch", 5)}


class _Cache:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob


class _Config:
    """Stands in for IBuilderConfig's two timing-cache calls, returning what their documentation says they return:
    create_timing_cache -> None for bytes it cannot read; set_timing_cache -> False for another device's cache."""

    def __init__(self) -> None:
        self.attached = None

    def create_timing_cache(self, blob: bytes):
        return None if blob.startswith(b"corrupt") else _Cache(blob)

    def set_timing_cache(self, cache: _Cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        if cache.blob.startswith(b"other-gpu"):
            return False
        self.attached = cache
        return True


@pytest.mark.parametrize(
    ("content", "loaded", "ignored"),
    [(None, False, None), (b"good", True, None), (b"corrupt", False, "corrupt"), (b"other-gpu", False, "device")],
)
def test_timing_cache_is_loaded_only_when_readable_and_made_for_this_device(tmp_path, content, loaded, ignored):
    path = tmp_path / "timing.cache"
    if content is not None:
        path.write_bytes(content)
    config = _Config()
    cache, info = attach_timing_cache(config, path)
    assert config.attached is cache and info["loaded"] is loaded
    assert cache.blob == (content if loaded else b"")  # otherwise a fresh cache, which the build writes back
    assert (ignored is None) == ("ignored" not in info) and (ignored is None or ignored in info["ignored"])


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
    assert facts["strongly_typed"] and facts["network_flags"] in (["STRONGLY_TYPED"], [])
    assert facts["sparsity"]["picked"] is not None  # the process-wide logger saw the build log
    assert (tmp_path / "timing.cache").stat().st_size > 0
    again = build_engine(onnx_path, tmp_path / "again.plan", (1, 16, 64), 1.0, timing_cache=tmp_path / "timing.cache",
                         build_json=tmp_path / "again.json")  # fmt: skip
    assert again["timing_cache"]["loaded"] and again["sparsity"]["picked"] is not None  # a second build still logs
    (tmp_path / "timing.cache").write_bytes(b"not a timing cache")
    third = build_engine(onnx_path, tmp_path / "third.plan", (1, 16, 64), 1.0, timing_cache=tmp_path / "timing.cache",
                         build_json=tmp_path / "third.json")  # fmt: skip
    assert not third["timing_cache"]["loaded"] and "ignored" in third["timing_cache"]
    runner, ort_runner = TensorRTRunner(tmp_path / "model.plan"), OnnxRuntimeRunner(onnx_path)
    for n in (1, 7, 64):
        data = BoardData(n, seed=n)
        got = runner((data.planes, data.side))
        want = ort_runner((data.planes, data.side))
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner((torch.zeros(65, 6, 8, 8), torch.zeros(65, 5)))
    data = BoardData(16, seed=3)
    fn, _ = runner.timed_callable([data.planes, data.side])  # CPU inputs: copied, then enqueued on another stream
    fn()
    torch.cuda.synchronize()
    for g, w in zip(runner._bench_buffers[1], ort_runner((data.planes, data.side))):
        np.testing.assert_allclose(g.float().cpu().numpy(), w.numpy(), rtol=1e-2, atol=1e-2)
