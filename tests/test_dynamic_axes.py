"""Dynamic axes beyond the batch: declared or by convention, in the ONNX graph, checked at other sizes, and
carried into the TensorRT optimization profile (issue 11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qatsparse.export.profile import onnx_input_dims, profile_shapes
from qatsparse.export.runners import OnnxRuntimeRunner, TorchRunner
from qatsparse.export.shapes import check_axes_spec, check_dim_ranges, dynamic_axes_of
from qatsparse.pipeline import ExportSettings, export_artifacts, plain_copy
from qatsparse.quantization import QuantConfig, calibrate, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Tokens(nn.Module):
    """Token ids -> embedding + position -> transformer encoder -> mean -> classes."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 32)
        self.pos = nn.Parameter(torch.randn(1, 64, 32) * 0.1)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 1)
        self.fc = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]
        return self.fc(self.enc(h).mean(1))


class FixedLength(nn.Module):
    """Flattens the sequence into one Linear: only the example's length works."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 8)
        self.fc = nn.Linear(8 * 8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tok(ids).flatten(1))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_token_ids_get_a_sequence_axis_that_onnxruntime_runs_at_other_lengths(tmp_path):
    torch.manual_seed(0)
    model = Tokens().eval()
    quantize_model(model, QuantConfig())
    ids = torch.randint(0, 50, (16, 8))
    calibrate(model, [ids], model)
    notes: list[str] = []
    paths = export_artifacts(model, [ids[:1]], ExportSettings(dirpath=tmp_path), notes=notes)
    assert any("input[1]='sequence'" in n and "convention" in n for n in notes), notes
    qat = TorchRunner(plain_copy(model), "qat")
    for path in paths.values():
        assert dynamic_axes_of(path) == {"input": {0: "batch", 1: "sequence"}}
        runner = OnnxRuntimeRunner(path)
        for length in (3, 8, 13):  # the example has 8 tokens
            x = torch.randint(0, 50, (4, length))
            out = runner((x,))[0]
            assert out.shape == (4, 5)
            if path == paths["model.onnx"]:
                assert _cos(out, qat((x,))[0]) > 0.999


def test_declared_image_axes_and_batch_only(tmp_path):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)]
    net = nn.Sequential(*layers).eval()
    x = torch.randn(1, 3, 16, 16)
    settings = ExportSettings(dirpath=tmp_path / "hw", dynamic_axes={"input": {2: "height", 3: "width"}})
    paths = export_artifacts(net, [x], settings)
    assert dynamic_axes_of(paths["model.onnx"]) == {"input": {0: "batch", 2: "height", 3: "width"}}
    x2 = torch.randn(2, 3, 24, 20)  # another height and width than the example's
    y = OnnxRuntimeRunner(paths["model.onnx"])((x2,))[0]
    with torch.no_grad():
        assert torch.allclose(y, net(x2), atol=1e-5)
    ids = torch.zeros(1, 8, dtype=torch.long)
    batch_only = export_artifacts(Tokens().eval(), [ids], ExportSettings(dirpath=tmp_path / "b", dynamic_axes=None))
    assert dynamic_axes_of(batch_only["model.onnx"]) == {"input": {0: "batch"}}


def test_an_axis_the_graph_fixes_is_an_error_when_declared_and_dropped_when_conventional(tmp_path):
    model, ids = FixedLength().eval(), torch.zeros(1, 8, dtype=torch.long)
    declared = ExportSettings(dirpath=tmp_path / "d", dynamic_axes={"input": {1: "sequence"}})
    with pytest.raises(ValueError, match="does not accept other sizes of the declared dynamic axes: sequence"):
        export_artifacts(model, [ids], declared)
    notes: list[str] = []
    paths = export_artifacts(model, [ids], ExportSettings(dirpath=tmp_path / "c"), notes=notes)
    assert any("dropped" in n and "sequence" in n for n in notes), notes
    assert dynamic_axes_of(paths["model.onnx"]) == {"input": {0: "batch"}}


def test_the_profile_reads_the_graphs_dims_and_arguments_are_checked(tmp_path):
    ids = torch.zeros(1, 8, dtype=torch.long)
    paths = export_artifacts(Tokens().eval(), [ids], ExportSettings(dirpath=tmp_path))
    dims = onnx_input_dims(paths["model.onnx"])
    assert dims == {"input": ("batch", "sequence")}
    profile = profile_shapes(dims, (1, 8, 32), {"sequence": (1, 64, 128)}, {"input": (1, 8)})
    assert profile["input"] == ((1, 1), (8, 64), (32, 128))
    with pytest.raises(ValueError, match="axis 0 is 'batch'"):
        check_axes_spec({"ids": {0: "sequence"}})
    with pytest.raises(ValueError, match="must be 'auto', None or"):
        check_axes_spec(["ids"])
    with pytest.raises(ValueError, match=r"dim_ranges\['sequence'\] must be \(min, opt, max\)"):
        check_dim_ranges({"sequence": (8, 4, 16)})
    from qatsparse import TensorRTExport

    with pytest.raises(ValueError, match="dim name 'batch'"):
        TensorRTExport(dynamic_axes={"input": {1: "batch"}})
    assert TensorRTExport(dim_ranges={"sequence": [1, 8, 64]}).settings.dim_ranges == {"sequence": (1, 8, 64)}
