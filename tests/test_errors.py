"""docs/errors.md, row by row: every rejected input fails before optimizer step 0, with its message, and
leaves nothing half-written in ``dirpath``."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
from qatsparse.export.tensorrt import tensorrt_available

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
STEPS = 4  # every Trainer here could take 4 optimizer steps


class Tiny(pl.LightningModule):
    """16 features -> 4 classes; ``body.0`` is 2:4-eligible, ``fc`` (4 outputs) is not."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Swapped(Tiny):
    """Batches are (label, features): its training_step knows, qatsparse's default reading does not."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        y, x = batch
        return F.cross_entropy(self(x), y)


class BadExample(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = torch.zeros(1, 8)  # the model takes 16 features


class OddPool(Tiny):
    """Pools a 4x4 map to 3x3 (VGG's AdaptiveAvgPool2d((7, 7)) on small images): the ONNX exporter refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.pool, self.fc = nn.AdaptiveAvgPool2d((3, 3)), nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x).reshape(-1, 1, 4, 4)).flatten(1))


class Huge(Tiny):
    """2.01 GiB of FP32 weights (539 M parameters, zeros: no initialization time): over ONNX's 2 GiB file limit."""

    def __init__(self) -> None:
        super().__init__()
        sizes = ((16, 23200), (23200, 23200))
        self.body = nn.Sequential(*(nn.utils.skip_init(nn.Linear, i, o, bias=False) for i, o in sizes))
        for p in self.body.parameters():
            p.data.zero_()
        self.fc = nn.Linear(23200, 4)


class Records(Dataset):
    """Dict samples ``{"image": ..., "label": ...}``."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.y[i]}


class DictTiny(Tiny):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["image"]), batch["label"])


def _xy(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g))


def loaders(kind: str = "xy") -> tuple[DataLoader, ...]:
    """The dataloaders given to ``fit`` for each kind of case."""
    if kind == "train_only":
        return (DataLoader(_xy(), batch_size=16),)
    if kind == "yx":
        ds = _xy()
        swapped = TensorDataset(ds.tensors[1], ds.tensors[0])
        return DataLoader(swapped, batch_size=16), DataLoader(swapped, batch_size=16)
    if kind == "dict":
        return DataLoader(Records(), batch_size=16), DataLoader(Records(), batch_size=16)
    if kind == "no_targets":
        return DataLoader(_xy(), batch_size=16), DataLoader(_xy().tensors[0], batch_size=16)
    return DataLoader(_xy(), batch_size=16), DataLoader(_xy(), batch_size=16)


@dataclass
class Case:
    """One row of docs/errors.md: the callbacks (built with the output folder), the data, the message."""

    id: str
    message: str
    callbacks: Callable[[Path], list]
    data: str = "xy"
    model: type = Tiny
    dirpath: Callable[[Path], Path] = field(default=lambda tmp: tmp / "out")
    trainer: dict = field(default_factory=dict)
    skip: str | None = None


def export(**kw: Any) -> Callable[[Path], list]:
    return lambda d: [TensorRTExport(dirpath=d, **kw)]


def _file(tmp: Path) -> Path:
    (tmp / "out").write_text("mine")
    return tmp / "out"


def _under_file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("mine")
    return tmp / "notes.txt" / "out"


CASES = [
    # ---------------------------------------------------------------------- arguments (at construction)
    Case("start_step negative", "TwoFourSparsity(start_step=-1): start_step must be an integer >= 0",
         lambda d: [TwoFourSparsity(start_step=-1)]),
    Case("pattern invalid", "pattern '(fc' is not a valid regular expression",
         lambda d: [TwoFourSparsity(exclude=["(fc"])]),
    Case("QAT precision", "precision must be one of ['int8', 'fp16'], got 'int4'",
         lambda d: [QuantizationAwareTraining(precision="int4")]),
    Case("QAT calibrator", "calibrator must be one of ['entropy', 'max', 'mse', 'percentile'], got 'kl'",
         lambda d: [QuantizationAwareTraining(calibrator="kl")]),
    Case("QAT calib_batches", "calib_batches must be an integer >= 1, got 0",
         lambda d: [QuantizationAwareTraining(calib_batches=0)]),
    Case("QAT compile mode", "QuantizationAwareTraining: compile='fastest' is not a torch.compile mode",
         lambda d: [QuantizationAwareTraining(compile="fastest")]),
    Case("opset", "TensorRTExport(opset=13): opset must be an integer >= 17", export(opset=13)),
    Case("max_metric_drop negative", "TensorRTExport(max_metric_drop=-0.1): a drop bound must be a finite number >= 0",
         export(max_metric_drop=-0.1)),
    Case("max_metric_drop NaN", "TensorRTExport(max_metric_drop['top1']=nan): a drop bound must be a finite number",
         export(max_metric_drop={"top1": math.nan})),
    Case("on_fail", "TensorRTExport(on_fail='ignore'): on_fail must be 'raise' or 'warn'", export(on_fail="ignore")),
    Case("build_engine value", "TensorRTExport(build_engine='yes'): build_engine must be 'auto', True or False",
         export(build_engine="yes")),
    Case("batch_sizes", "TensorRTExport(batch_sizes=(32, 1, 256)): batch_sizes is TensorRT's optimization profile",
         export(batch_sizes=(32, 1, 256))),
    Case("workspace_gb", "TensorRTExport(workspace_gb=0): workspace_gb must be a number > 0", export(workspace_gb=0)),
    Case("metric import", "cannot import metric 'torchmetrics.NoSuchMetric'",
         export(metrics="torchmetrics.NoSuchMetric")),
    # ---------------------------------------------------------------------- at fit start (on every rank)
    Case("dirpath is a file", "is an existing file, not a folder; choose another dirpath", export(), dirpath=_file),
    Case("dirpath cannot be created", "the folder cannot be created", export(), dirpath=_under_file),
    Case("pruning never reached",
         f"TwoFourSparsity(start_step=500) is never reached: this Trainer stops after {STEPS} optimizer step(s)",
         lambda d: [TwoFourSparsity(start_step=500)]),
    Case("QAT never reached", "QuantizationAwareTraining(start_step=600) is never reached",
         lambda d: [QuantizationAwareTraining(start_step=600)]),
    Case("never reached in max_epochs", "TwoFourSparsity(start_step=10) is never reached: this Trainer stops after 8 "
         "optimizer step(s) (max_epochs=2 x 4 training batches per epoch)", lambda d: [TwoFourSparsity(start_step=10)],
         trainer={"max_steps": -1, "max_epochs": 2}),
    Case("both never reached", "qatsparse found 2 problems before training (no optimizer step was taken)",
         lambda d: [TwoFourSparsity(start_step=500), QuantizationAwareTraining(start_step=600), TensorRTExport(d)]),
    Case("include matches nothing", "TwoFourSparsity: include: pattern 'conv' matches no prunable weight",
         lambda d: [TwoFourSparsity(include=["conv"])]),
    Case("exclude matches nothing", "TwoFourSparsity: exclude: pattern 'classifier' matches no prunable weight",
         lambda d: [TwoFourSparsity(exclude=["classifier"])]),
    Case("glob matches nothing", "TwoFourSparsity: exclude: pattern '*head*' matches no prunable weight",
         lambda d: [TwoFourSparsity(exclude=["*head*"])]),
    Case("QAT exclude matches nothing",
         "QuantizationAwareTraining(exclude=['classifier']): pattern 'classifier' matches no quantizable layer",
         lambda d: [QuantizationAwareTraining(exclude=["classifier"])]),
    Case("training batch layout", "QuantizationAwareTraining (calibration runs the model on training batches): "
         "Swapped cannot take the inputs qatsparse reads: batch list(Tensor[16], Tensor[16, 16])",
         lambda d: [QuantizationAwareTraining()], data="yx", model=Swapped),
    Case("dict batch keys", "a dict batch dict(image=Tensor[16, 16], label=Tensor[16]) has no tensor entry named "
         "after a parameter of DictTiny.forward(x)", lambda d: [QuantizationAwareTraining()], data="dict",
         model=DictTiny),
    Case("validation batch layout", "TensorRTExport (validation batches): Swapped cannot take the inputs",
         export(), data="yx", model=Swapped),
    Case("no validation data", "TensorRTExport needs validation data and this fit has none", export(),
         data="train_only"),
    Case("gate names an unknown metric",
         "TensorRTExport(max_metric_drop={'acc': 0.01}): ['acc'] will not be computed; the metrics are ['top1']",
         export(max_metric_drop={"acc": 0.01})),
    Case("gate checks nothing", "TensorRTExport: no metric can be computed on the validation batches", export(),
         data="no_targets"),
    Case("metric fails on the outputs",
         "TensorRTExport(metrics='torchmetrics.MeanSquaredError'): computing the metrics on the first validation",
         export(metrics="torchmetrics.MeanSquaredError")),
    Case("output_names count", "TensorRTExport(output_names=['a', 'b']): the model returns 1 output(s)",
         export(output_names=["a", "b"])),
    Case("input_names count", "TensorRTExport(input_names=['a', 'b']): the model takes",
         export(input_names=["a", "b"])),
    Case("keep_fp32 unknown", "TensorRTExport(keep_fp32=['head']): ['head'] are not module names of Tiny",
         export(keep_fp32=["head"])),
    Case("example_input_array", "TensorRTExport (the export example, BadExample.example_input_array): BadExample "
         "cannot take the inputs", export(), model=BadExample),
    Case("adaptive pooling the exporter refuses", "TensorRTExport: the model cannot be exported to ONNX at the size of "
         "its export input", export(), model=OddPool),
    Case("model over ONNX's 2 GiB", "TensorRTExport: the model's weights take 2.01 GiB in FP32", export(), model=Huge),
    Case("build_engine=True without TensorRT", "TensorRTExport(build_engine=True): `import tensorrt` fails",
         export(build_engine=True), skip="TensorRT is importable here" if tensorrt_available() else None),
]  # fmt: skip


def _snapshot(path: Path) -> Any:
    if path.is_file():
        return path.read_bytes()
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rejected_before_the_first_step_leaving_nothing_behind(case: Case, tmp_path: Path):
    if case.skip:
        pytest.skip(case.skip)
    out = case.dirpath(tmp_path)
    before_out = _snapshot(out)
    torch.manual_seed(0)
    model = case.model()
    weights = copy.deepcopy(model.state_dict())
    trainer = None
    with pytest.raises((ValueError, TypeError, RuntimeError)) as e:
        callbacks = case.callbacks(out)
        kwargs = {"max_steps": STEPS, "num_sanity_val_steps": 0, **case.trainer}
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **kwargs,
        )
        trainer.fit(model, *loaders(case.data))
    assert case.message in str(e.value)
    assert trainer is None or trainer.global_step == 0
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items()), "an optimizer step was taken"
    assert _snapshot(out) == before_out, "something was written in dirpath"


def test_every_rejected_input_is_in_docs_errors_md():
    doc = DOC.read_text()
    unescaped = re.sub(r"\\(.)", r"\1", doc.replace("`", ""))
    missing = [c.id for c in CASES if c.message.replace("`", "") not in unescaped]
    assert missing == [], f"docs/errors.md lacks the message of {missing}"
