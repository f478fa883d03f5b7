"""Acceptance: torchvision resnet18 and mobilenet_v3_small pruned by TwoFourSparsity are 2:4 in PyTorch and
in the exported ONNX; mobilenet's depthwise convs are skipped with their reason."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qatsparse import TwoFourSparsity
from qatsparse.export.onnx import export_onnx, record_pruned_layers, weighted_node_names
from qatsparse.sparsity import check_2to4, find_prunable

torchvision = pytest.importorskip("torchvision")
ort = pytest.importorskip("onnxruntime")


class _Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = torch.zeros(1, 3, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 1000, (8,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=4)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_are_2to4_in_pytorch_and_onnx(tmp_path, arch):
    pl.seed_everything(0)
    model = _Classifier(getattr(torchvision.models, arch)(weights=None))
    expected = find_prunable(model)
    sparsity = TwoFourSparsity(start_step=0, verbose=False)
    before = {n: m.weight.detach().clone() for n, m in expected.eligible.items()}
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[sparsity],
    )
    trainer.fit(model)
    assert trainer.global_step == 3
    # every eligible layer was pruned, trained, and is 2:4 in PyTorch
    assert sorted(sparsity.pruned_layers) == sorted(expected.eligible) and len(expected.eligible) > 10
    assert sparsity.masks.skipped == expected.skipped
    assert check_2to4(model) == []
    modules = dict(model.named_modules())
    for n in expected.eligible:
        w = modules[n].weight
        assert float((w == 0).float().mean()) == 0.5
        assert not torch.equal(w[sparsity.masks.masks[n]], before[n][sparsity.masks.masks[n].cpu()])
    if arch == "resnet18":
        assert sparsity.masks.skipped == {"net.conv1": "C_in=3 not a multiple of 16"}
    else:
        depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert len(depthwise) == 11
        assert {n: sparsity.masks.skipped[n] for n in depthwise} == dict.fromkeys(
            depthwise, "depthwise conv: not supported by sparse kernels"
        )

    # ... and in the exported ONNX
    path = export_onnx(model, [model.example_input_array], tmp_path / f"{arch}.onnx")
    recorded = record_pruned_layers(path, sparsity.pruned_layers)
    assert len(recorded) == len(sparsity.pruned_layers)
    assert check_2to4(path) == []
    nodes = weighted_node_names(path)
    violating = {v.layer for v in check_2to4(path, layers="all")}
    assert violating and violating <= {nodes[n] for n in sparsity.masks.skipped}  # only skipped layers are dense

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


class _AuxAndBias(nn.Module):
    """googlenet's auxiliary head (run in training only) and Swin V2's position-bias MLP (over a fixed
    coordinate table): both prunable, neither in the exported graph (coverage matrix, issue 11)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.aux = nn.Linear(32, 16)
        self.bias_mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
        self.register_buffer("table", torch.linspace(-1, 1, 4 * 16).reshape(4, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) + self.bias_mlp(self.table).mean(0)
        return torch.cat([y, self.aux(x)], 1) if self.training else y


def test_pruned_layers_without_a_node_are_named_not_failed(tmp_path):
    from qatsparse.export.onnx import ABSENT_METADATA_KEY, get_metadata
    from qatsparse.pipeline import ExportSettings, export_artifacts
    from qatsparse.quantization import QuantConfig, calibrate, quantize_model
    from qatsparse.sparsity import prune_2to4

    torch.manual_seed(0)
    model = _AuxAndBias()
    pruned = list(prune_2to4(model).masks)
    assert {"fc", "aux", "bias_mlp.0", "bias_mlp.2"} == set(pruned)
    quantize_model(model.eval(), QuantConfig(exclude=["aux"]))  # the QAT callback keeps it as it is
    x = torch.randn(8, 32)
    calibrate(model, [x], model)
    notes: list[str] = []
    paths = export_artifacts(model, (x[:2],), ExportSettings(dirpath=tmp_path), pruned_layers=pruned, notes=notes)
    # The Q/DQ graph keeps the bias MLP (DequantizeLinear of its INT8 weights is never folded); the FP32 one folds it.
    for name, keys in (("model_fp32.onnx", {"aux", "bias_mlp.0", "bias_mlp.2"}), ("model.onnx", {"aux"})):
        absent = json.loads(get_metadata(paths[name])[ABSENT_METADATA_KEY])
        assert absent.keys() == keys, (name, absent)
        assert "eval mode" in absent["aux"] and all("constant" in absent[k] for k in keys - {"aux"})
        assert check_2to4(paths[name]) == []  # the pruned layers that are in the graph are 2:4
    assert any("1 pruned layer(s) have no node in model.onnx" in n and "aux: not run" in n for n in notes)
    with pytest.raises(ValueError, match="pruned layers not found"):  # without the inputs: no explanation
        record_pruned_layers(paths["model.onnx"], pruned, model=model)
