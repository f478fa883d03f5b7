"""The models people bring go through prune -> QAT -> export (issue 11): transformers GPT-2 (``Conv1D``) at
another sequence length than the example's, torchvision ``VisionTransformer`` (attention weights used without
``Linear.forward``). Tiny configurations, random weights, a few steps on random data. ``mnasnet0_5`` (state-dict
metadata) and Swin (weights used through ``F.linear``) go through in the coverage matrix's CI subset
(``tests/test_coverage.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
from qatsparse.export.runners import OnnxRuntimeRunner, TorchRunner
from qatsparse.export.shapes import dynamic_axes_of
from qatsparse.pipeline import plain_copy
from qatsparse.sparsity import check_2to4, pruned_layers_from_metadata

torchvision = pytest.importorskip("torchvision")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Wrap(pl.LightningModule):
    def __init__(self, net: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return getattr(y, "logits", y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _loader(example: torch.Tensor, n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    if example.is_floating_point():
        x = torch.randn(n, *example.shape[1:], generator=g)
    else:
        x = torch.randint(1, 100, (n, *example.shape[1:]), generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=8)


def _run(tmp_path, net: nn.Module, example: torch.Tensor) -> tuple[Wrap, Any, Any, Any]:
    pl.seed_everything(0)
    model = Wrap(net, example)
    sparsity = TwoFourSparsity(start_step=0, verbose=False)
    qat = QuantizationAwareTraining(start_step=2, calib_batches=2, verbose=False)
    export = TensorRTExport(dirpath=tmp_path, max_metric_drop=1.0)
    trainer = pl.Trainer(
        max_steps=4,
        callbacks=[sparsity, qat, export],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    trainer.fit(model, _loader(example, 32, 0), _loader(example, 8, 1))
    return model, sparsity, qat, export


def _check_export(tmp_path, model: Wrap, sparsity: TwoFourSparsity, x: torch.Tensor) -> None:
    """Every pruned weight is found and 2:4 in both ONNX files; ONNX Runtime computes the QAT model."""
    for f in ("model_fp32.onnx", "model.onnx"):
        assert set(pruned_layers_from_metadata(tmp_path / f)) == set(sparsity.pruned_layers), f
        assert check_2to4(tmp_path / f) == [], f
    a = OnnxRuntimeRunner(tmp_path / "model.onnx")((x,))[0].double().flatten()
    b = TorchRunner(plain_copy(model), "qat")((x,))[0].double().flatten()
    assert float(a @ b / (a.norm() * b.norm())) > 0.999


def test_gpt2_conv1d_is_pruned_quantized_and_exported_with_a_sequence_axis(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, num_labels=10, pad_token_id=0
    )
    net = transformers.GPT2ForSequenceClassification(cfg)
    model, sparsity, qat, _ = _run(tmp_path, net, torch.ones(1, 12, dtype=torch.long))
    conv1d = [n for n, m in model.named_modules() if type(m).__name__.startswith("Quant_transformers")]
    assert len(conv1d) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj in each of 2 blocks: Conv1D, quantized
    assert set(conv1d) <= set(qat.summary.quantized) and set(conv1d) <= set(sparsity.pruned_layers)
    assert float((model.net.transformer.h[0].attn.c_attn.weight == 0).float().mean()) == 0.5  # along axis 0
    assert qat.summary.skipped["net.transformer.wte"].startswith("embedding")
    assert dynamic_axes_of(tmp_path / "model.onnx") == {"input": {0: "batch", 1: "sequence"}}
    _check_export(tmp_path, model, sparsity, torch.randint(1, 100, (4, 7)))  # another length than the example's


def test_torchvision_vit_attention_is_pruned_and_quantized(tmp_path):
    net = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    model, sparsity, qat, _ = _run(tmp_path, net, torch.zeros(1, 3, 32, 32))
    attn = "net.encoder.layers.encoder_layer_0.self_attention"
    assert {f"{attn}.in_proj_weight", f"{attn}.out_proj"} <= set(sparsity.pruned_layers)
    assert {attn, f"{attn}.out_proj"} <= set(qat.summary.quantized)
    assert qat.summary.skipped["net"].startswith("VisionTransformer uses its own parameter(s) class_token")
    _check_export(tmp_path, model, sparsity, torch.randn(4, 3, 32, 32))
