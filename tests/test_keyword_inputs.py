"""Dict batches and keyword inputs end to end: calibration, ONNX export with named inputs, validation in
ONNX Runtime fed by name; and the layouts qatsparse reads without any code of the user's."""

from __future__ import annotations

import json
from typing import Any

import onnx
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qatsparse import QuantizationAwareTraining, TensorRTExport
from qatsparse.batches import batch_inputs, batch_targets, call_model
from qatsparse.quantization import quantizers


class Tokens(Dataset):
    """Hugging Face style samples: ``{"attention_mask", "input_ids", "labels"}`` (keys not in forward's order).

    The label is the most frequent of the unmasked ids' low 2 bits, learnable from an embedding bag."""

    def __init__(self, n: int = 96, length: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 32, (n, length), generator=g)
        self.mask = (torch.rand(n, length, generator=g) > 0.2).float()
        self.labels = torch.stack(
            [torch.bincount(i[m > 0] % 4, minlength=4).argmax() for i, m in zip(self.ids, self.mask)]
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"attention_mask": self.mask[i], "input_ids": self.ids[i], "labels": self.labels[i]}


class TokenClassifier(pl.LightningModule):
    """``forward(input_ids, attention_mask)``: masked mean of embeddings, then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = (self.embed(input_ids) * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True).clamp(
            min=1
        )
        return self.mlp(h)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class KeywordsFromTuples(pl.LightningModule):
    """``forward(**inputs)`` fed by ``batch_inputs`` returning a dict from ``(x, scale, y)`` tuples."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs["x"] * inputs["scale"])

    def batch_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        return {"x": batch[0], "scale": batch[1]}

    def batch_targets(self, batch: Any) -> torch.Tensor:
        return batch[2]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(**self.batch_inputs(batch)), batch[2])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(model: pl.LightningModule, train: DataLoader, val: DataLoader, out) -> dict:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # the validation loop never runs; the export still finds the loader
        callbacks=[
            QuantizationAwareTraining(calib_batches=2, start_step=6, verbose=False),
            TensorRTExport(dirpath=out, max_metric_drop=0.5),
        ],
    )
    trainer.fit(model, train, val)
    return json.loads((out / "report.json").read_text())


def test_dict_batches_calibrate_export_named_inputs_and_validate_by_name(tmp_path):
    torch.manual_seed(0)
    model = TokenClassifier()
    report = _fit(model, DataLoader(Tokens(), batch_size=16), DataLoader(Tokens(48, seed=1), batch_size=16), tmp_path)
    qs = quantizers(model)
    assert {"mlp.0.input_quantizer", "mlp.2.input_quantizer"} <= set(qs) and all(q._has_amax for q in qs.values())
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["attention_mask", "input_ids"]  # the batch's keys, in its order
    assert report["samples"] == 48 and report["passed"] is True
    assert report["quantization"]["precision"] == "int8"
    b = report["backends"]
    assert b["onnxruntime"]["metrics"]["top1"] == pytest.approx(b["pytorch_qat"]["metrics"]["top1"], abs=1 / 48)


def test_batch_inputs_returning_keywords_for_a_var_keyword_forward(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, scale = torch.randn(64, 16, generator=g), torch.rand(64, 1, generator=g) + 0.5
    data = list(zip(x, scale, (x[:, :4] * scale).argmax(1)))
    model = KeywordsFromTuples()
    report = _fit(model, DataLoader(data, batch_size=16), DataLoader(data[:32], batch_size=16), tmp_path)
    assert [i.name for i in onnx.load(str(tmp_path / "model.onnx")).graph.input] == ["x", "scale"]
    b = report["backends"]
    assert b["onnxruntime"]["metrics"]["top1"] == pytest.approx(b["pytorch_qat"]["metrics"]["top1"], abs=1 / 32)
    assert report["passed"] and report["samples"] == 32


def test_layouts_read_without_user_code():
    tok = TokenClassifier()
    batch = {"labels": torch.tensor([1]), "input_ids": torch.zeros(1, 3, dtype=torch.long), "extra": torch.ones(1)}
    batch["attention_mask"] = torch.ones(1, 3)
    assert list(batch_inputs(tok, batch)) == ["input_ids", "attention_mask"]  # forward's parameters, not labels
    assert batch_targets(tok, batch)[0].tolist() == [1]
    assert call_model(tok, batch_inputs(tok, batch)).shape == (1, 4)
    x, y = torch.zeros(2, 16), torch.zeros(2, dtype=torch.long)
    assert batch_inputs(None, (x, y))[0] is x and all(t is x for t in batch_inputs(None, ((x, x), y)))

    class Broken(KeywordsFromTuples):
        def batch_inputs(self, batch: Any) -> Any:
            return ["x"]

    with pytest.raises(TypeError, match=r"Broken.batch_inputs\(batch\) is list\(str\)"):
        batch_inputs(Broken(), (x, y))
