"""nn.MultiheadAttention and the layers built on it: 2:4, INT8, PyTorch's fast paths, export (issue 11).

The three crashes of the issue are tests here: an MHA block through the whole pipeline (pruned layers were
"not found" in the ONNX), the INT8+FP16 graph that made ONNX Runtime segfault (opened in a subprocess), and
``nn.TransformerEncoderLayer`` calibration (its fast path bypassed every quantized layer).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import onnx
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
from qatsparse.attention import attention_forward, fast_paths_off
from qatsparse.examples import DigitsDataModule
from qatsparse.export.fp16 import convert_to_fp16
from qatsparse.export.runners import OnnxRuntimeRunner, TorchRunner
from qatsparse.pipeline import ExportSettings, export_artifacts, plain_copy
from qatsparse.quantization import QuantConfig, calibrate, quantize_model, quantizers
from qatsparse.sparsity import (
    check_2to4,
    find_prunable,
    format_summary,
    prune_2to4,
    pruned_layers_from_metadata,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Rows(pl.LightningModule):
    """The digits' 8 rows as 8 tokens of 8 pixels: embed -> attention block -> mean -> classifier."""

    def __init__(self, block: str = "mha", batch_first: bool = False) -> None:
        super().__init__()
        self.block, self.batch_first = block, batch_first
        self.embed = nn.Linear(8, 64)
        if block == "mha":
            self.attn = nn.MultiheadAttention(64, 4, batch_first=batch_first)  # PyTorch's defaults otherwise
        elif block == "encoder":
            self.attn = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=batch_first)
        self.fc = nn.Linear(64, 10)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1, 2))  # (B, 8, 64)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = h + self.attn(h, h, h)[0] if self.block == "mha" else self.attn(h)
        return self.fc(h.mean(1 if self.batch_first else 0))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def _fit(model: pl.LightningModule, callbacks: list, max_steps: int, **kw: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        **kw,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    return trainer


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _open_in_subprocess(path: Any, shape: tuple[int, ...]) -> subprocess.CompletedProcess:
    """Create an ONNX Runtime session with default graph optimizations and run it, in a child process: a
    crash (SIGSEGV) fails the test through the return code instead of killing the test run."""
    code = textwrap.dedent(
        f"""
        import numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        y = s.run(None, {{s.get_inputs()[0].name: np.random.rand(*{shape!r}).astype(np.float32)}})[0]
        print("ran", y.shape)
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ the computation
def test_attention_forward_equals_pytorch_multihead_attention():
    """Every variant: batch_first both ways, self/cross attention (key is value or not), packed and kdim/vdim
    weights, masks (bool, float, 3-D, key padding), need_weights and head averaging, unbatched inputs."""
    torch.manual_seed(0)
    n, L, S, worst = 3, 5, 7, 0.0
    cases = itertools.product([True, False], [None, 24], [True, False], ["self", "kv", "qkv"], ["none", "bool", "kpm"])
    for batch_first, kdim, need, mode, masks in cases:
        if kdim and mode == "self":
            continue
        m = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
        mk = (lambda t, e: torch.randn(n, t, e)) if batch_first else (lambda t, e: torch.randn(t, n, e))
        q = mk(L, 16)
        k = q if mode == "self" else mk(S, kdim or 16)
        v = k if mode in ("self", "kv") else mk(S, kdim or 16)
        s = L if mode == "self" else S
        attn_mask = (torch.rand(L, s) > 0.7) & (torch.arange(s) > 0) if masks == "bool" else None
        kpm = (torch.rand(n, s) > 0.6) & (torch.arange(s) > 0) if masks == "kpm" else None
        with fast_paths_off(), torch.no_grad():
            ref, ref_w = m(q, k, v, key_padding_mask=kpm, need_weights=need, attn_mask=attn_mask)
            out, w = attention_forward(m, q, k, v, key_padding_mask=kpm, need_weights=need, attn_mask=attn_mask)
        assert out.shape == ref.shape
        worst = max(worst, float((out - ref).abs().max()))
        if need:
            worst = max(worst, float((w - ref_w).abs().max()))
        else:
            assert w is None
    m = nn.MultiheadAttention(16, 4).eval()
    x = torch.randn(5, 16)  # unbatched
    with torch.no_grad():
        worst = max(worst, float((attention_forward(m, x, x, x)[0] - m(x, x, x)[0]).abs().max()))
    assert worst < 1e-5


# ------------------------------------------------------------------ crash 1: pruned layers "not found"
def test_mha_block_is_pruned_quantized_and_found_again_in_the_onnx(tmp_path):
    pl.seed_everything(0)
    model = Rows("mha", batch_first=False)  # nn.MultiheadAttention with PyTorch's default settings
    sparsity = TwoFourSparsity(start_step=0, exclude=["fc"], verbose=False)
    qat = QuantizationAwareTraining(start_step=12, calib_batches=2, verbose=False)
    export = TensorRTExport(dirpath=tmp_path, max_metric_drop=1.0)
    _fit(model, [sparsity, qat, export], max_steps=16)

    assert sorted(sparsity.pruned_layers) == ["attn.in_proj_weight", "attn.out_proj"]
    assert check_2to4(model) == []
    assert float((model.attn.in_proj_weight == 0).float().mean()) == 0.5
    assert {"attn", "attn.out_proj"} <= set(qat.summary.quantized)
    for f in ("model_fp32.onnx", "model.onnx"):
        recorded = pruned_layers_from_metadata(tmp_path / f)
        assert set(recorded) == {"attn.in_proj_weight", "attn.out_proj"}
        assert check_2to4(tmp_path / f) == []
    # the in/out projections of model.onnx take both inputs through Q/DQ, and ONNX Runtime computes the QAT model
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    recorded = pruned_layers_from_metadata(tmp_path / "model.onnx")
    for node in (n for n in graph.node if n.name in {x for v in recorded.values() for x in v}):
        ops = []
        for name in node.input[:2]:
            p = producer[name]
            while p.op_type == "Transpose":
                p = producer[p.input[0]]
            ops.append(p.op_type)
        assert ops == ["DequantizeLinear", "DequantizeLinear"], (node.name, ops)
    x = torch.randn(16, 1, 8, 8)
    ort_out = OnnxRuntimeRunner(tmp_path / "model.onnx")((x,))[0]
    qat_out = TorchRunner(plain_copy(model), "qat")((x,))[0]
    assert _cosine(ort_out, qat_out) > 0.999
    assert export.report["sparsity"]["pruned_layers"] == sparsity.pruned_layers


# ------------------------------------------------------------------ crash 2: ONNX Runtime segfault
def test_fp16_transpose_matmul_graph_opens_in_onnxruntime(tmp_path):
    """The minimal graph on which ONNX Runtime's CPU optimizer crashed (qatsparse.export.rewrites): FP16
    Transpose [1, 0, 2] -> MatMul with a constant weight. The FP16 conversion moves the transpose below."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), helper.make_node("MatMul", ["t", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, "b", 32])],
        [w],
    )
    fp32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    fp16, info = convert_to_fp16(fp32)
    assert [n.op_type for n in fp16.graph.node] == ["Cast", "MatMul", "Transpose", "Cast"]
    assert any("Transpose(s) moved below" in n for n in info.notes)
    onnx.save(fp16, str(tmp_path / "fp16.onnx"))
    run = _open_in_subprocess(tmp_path / "fp16.onnx", (2, 8, 64))
    assert run.returncode == 0 and "ran (8, 2, 32)" in run.stdout, run.stderr[-2000:]


def test_int8_fp16_export_of_an_attention_block_opens_in_onnxruntime(tmp_path):
    """The issue's scenario: out_proj excluded, INT8 + FP16 remainder; default graph optimizations."""
    torch.manual_seed(0)
    model = Rows("mha", batch_first=True).eval()
    quantize_model(model, QuantConfig(exclude=["out_proj"]))
    x = torch.randn(32, 1, 8, 8)
    calibrate(model, [x], model)
    paths = export_artifacts(model, [x[:1]], ExportSettings(dirpath=tmp_path))
    run = _open_in_subprocess(paths["model.onnx"], (4, 1, 8, 8))
    assert run.returncode == 0 and "ran (4, 10)" in run.stdout, run.stderr[-2000:]


# ------------------------------------------------------------------ crash 3: the encoder fast path
def test_transformer_encoder_layer_calibrates_and_validates_through_its_quantized_layers(tmp_path):
    pl.seed_everything(0)
    model = Rows("encoder", batch_first=True)
    qat = QuantizationAwareTraining(start_step=2, calib_batches=2, verbose=False)
    assert torch.backends.mha.get_fastpath_enabled()
    trainer = _fit(model, [qat], max_steps=4)
    assert torch.backends.mha.get_fastpath_enabled(), "the user's fast-path setting is restored after fit"
    qs = quantizers(model)
    for layer in ("attn.self_attn", "attn.self_attn.out_proj", "attn.linear1", "attn.linear2"):
        assert qs[f"{layer}.input_quantizer"].calibrated, layer
    assert not [k for k in qat.config.higher_precision if "not reached" in qat.config.higher_precision[k]]
    # trainer.validate of the QAT model runs the quantized layers (the fused fast path would skip them)
    calls = []
    hook = qs["attn.linear1.input_quantizer"].register_forward_hook(lambda *a: calls.append(1))
    trainer.validate(model, datamodule=DigitsDataModule(batch_size=32), verbose=False)
    hook.remove()
    assert calls and torch.backends.mha.get_fastpath_enabled()


# ------------------------------------------------------------------ named, never silent
def test_lstm_embedding_and_subclasses_are_named_with_reasons():
    class OwnForward(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.lstm = nn.LSTM(32, 32)
            self.custom = OwnForward(32, 32)
            self.fc = nn.Linear(32, 16)

    net = Net()
    elig = find_prunable(net)
    assert elig.skipped["lstm"].startswith("recurrent layer (LSTM)")
    assert elig.skipped["emb"].startswith("embedding (Embedding)")
    assert set(elig.eligible) == {"custom", "fc"}  # pruning a weight does not depend on the forward
    masks = prune_2to4(net)
    text = format_summary(masks, net)
    assert "recurrent layer (LSTM)" in text and ": lstm" in text
    summary = quantize_model(net, QuantConfig())
    assert summary.quantized == ["fc"]
    assert summary.skipped["custom"] == "subclass OwnForward of Linear with its own forward (kept as it is)"
    assert summary.skipped["lstm"].startswith("recurrent layer (LSTM)")
    assert summary.skipped["emb"].startswith("embedding (Embedding)")


# ------------------------------------------------------------------ variants through export
class CrossAndKdim(nn.Module):
    """Cross-attention on a packed weight (key is value: the query rows and key/value rows are separate
    GEMMs), an attention with kdim/vdim (separate q/k/v weights) returning its weights, and self-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(32, 4, batch_first=True)
        self.kdim = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)
        self.self_attn = nn.MultiheadAttention(32, 2)  # sequence first
        self.mem = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mem = x[:, :3]
        h = self.cross(x, mem, mem, need_weights=False)[0]
        kv = self.mem(x)
        h2, w = self.kdim(h, kv, kv, need_weights=True)
        s = self.self_attn(h2.transpose(0, 1), h2.transpose(0, 1), h2.transpose(0, 1))[0].transpose(0, 1)
        return s + w.sum(-1, keepdim=True)


def test_cross_attention_kdim_and_need_weights_export_2to4_and_agree(tmp_path):
    torch.manual_seed(0)
    model = CrossAndKdim().eval()
    masks = prune_2to4(model, include=["cross", "kdim", "self_attn"])
    assert "cross.in_proj_weight" in masks.masks and "kdim.k_proj_weight" in masks.masks
    quantize_model(model, QuantConfig(calibrator="max"))
    x = torch.randn(16, 6, 32)
    calibrate(model, [x], model)
    paths = export_artifacts(model, [x[:1]], ExportSettings(dirpath=tmp_path), pruned_layers=list(masks.masks))
    for path in paths.values():
        recorded = pruned_layers_from_metadata(path)
        assert set(recorded) == set(masks.masks)
        assert len(recorded["cross.in_proj_weight"]) == 2  # query rows and key/value rows
        assert check_2to4(path) == []
    ort_out = OnnxRuntimeRunner(paths["model.onnx"])((x,))[0]
    qat_out = TorchRunner(plain_copy(model), "qat")((x,))[0]
    assert _cosine(ort_out, qat_out) > 0.999
