"""Export -> (build) -> validate -> report, as one pure function over modules and a dataloader.

The export callback and the ``qatsparse export``/``validate`` commands both call
:func:`export_and_validate`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from qatsparse.batches import example_inputs
from qatsparse.export.onnx import export_onnx, record_pruned_layers
from qatsparse.export.runners import OnnxRuntimeRunner, Runner, TorchRunner
from qatsparse.quantization import prepare_for_onnx_export, quantizers, remove_quantizers
from qatsparse.report import build_report, print_console, write_report
from qatsparse.sparsity.check import sparsity_summary
from qatsparse.validation import gate, validate


@dataclass
class ExportSettings:
    """Where and how to export, build and gate (see :class:`~qatsparse.TensorRTExport`).

    Example:
        >>> ExportSettings(dirpath=Path("export")).batch_sizes
        (1, 32, 256)
    """

    dirpath: Path
    max_metric_drop: float | Mapping[str, float] = 0.01
    build_engine: bool | Literal["auto"] = "auto"
    batch_sizes: tuple[int, ...] = (1, 32, 256)
    workspace_gb: float = 4.0
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    opset: int = 17
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")


class _FP16Graph(nn.Module):
    """Runs ``model`` in FP16 with FP32 inputs and outputs (casts at the I/O), for the FP16 ONNX."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, *inputs: torch.Tensor) -> Any:
        out = self.model(*(t.half() if t.is_floating_point() else t for t in inputs))
        if isinstance(out, torch.Tensor):
            return out.float()
        return tuple(o.float() for o in out)


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy on the CPU in FP32 eval mode, without ``LightningModule.compile()``'s wrapper (the
    copied wrapper would still call the original module)."""
    module = copy.deepcopy(module).cpu().float().eval()
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return module


def _precision(model: nn.Module) -> str:
    qs = list(quantizers(model).values())
    return qs[0].precision if qs else "fp32"


def export_and_validate(
    final: nn.Module,
    reference: nn.Module | None,
    val_loader: Any,
    settings: ExportSettings,
    pruned_layers: Sequence[str] = (),
    skipped_layers: Mapping[str, str] | None = None,
    quantization: Mapping[str, Any] | None = None,
    console: bool = True,
) -> dict[str, Any]:
    """Write the ONNX files (and engine), validate every backend on ``val_loader``, write the report.

    Args:
        final: the trained (possibly pruned and fake-quantized) model.
        reference: the dense FP32 model before compression; ``None`` uses the final model without
            its quantizers (nothing was compressed).
        val_loader: validation dataloader.
        settings: output folder, gate and build settings.
        pruned_layers: module names of the 2:4 layers (recorded in the ONNX metadata).
        skipped_layers: layers not pruned, with the reason (for the report).
        quantization: what the QAT callback reports.
        console: print the rich table.

    Returns:
        The report dictionary (also written as report.json/md/png).
    """
    d = Path(settings.dirpath)
    d.mkdir(parents=True, exist_ok=True)
    inputs = example_inputs(final, val_loader)
    final = plain_copy(final)
    precision = _precision(final)
    fp32 = remove_quantizers(copy.deepcopy(final))
    reference = plain_copy(reference) if reference is not None else fp32
    names = {"input_names": settings.input_names, "output_names": settings.output_names, "opset": settings.opset}
    notes: list[str] = []

    fp32_path = export_onnx(fp32, inputs, d / "model_fp32.onnx", **names)
    deploy_path = d / "model.onnx"
    if precision == "int8":
        qdq = copy.deepcopy(final)
        prepare_for_onnx_export(qdq)
        export_onnx(qdq, inputs, deploy_path, **names)
    elif precision == "fp16":
        export_onnx(_FP16Graph(copy.deepcopy(fp32)), inputs, deploy_path, **names)
    else:
        export_onnx(fp32, inputs, deploy_path, **names)
        notes.append("no quantization callback ran: model.onnx is the FP32 graph")
    if pruned_layers:
        for p in (fp32_path, deploy_path):
            record_pruned_layers(p, list(pruned_layers))

    runners: list[Runner] = [TorchRunner(reference, "pytorch_fp32", "fp32", settings.device)]
    final_name = "pytorch_qat" if precision != "fp32" else "pytorch_final"
    runners.append(TorchRunner(final, final_name, precision, settings.device))
    runners.append(OnnxRuntimeRunner(deploy_path, "onnxruntime", precision))
    precisions = {r.name: r.precision for r in runners}

    artifacts = {"model_fp32.onnx": str(fp32_path), "model.onnx": str(deploy_path)}
    engine_runner = _maybe_build_engine(deploy_path, d, settings, precision, bool(pruned_layers), notes, artifacts)
    if engine_runner is not None:
        runners.append(engine_runner)
        precisions[engine_runner.name] = engine_runner.precision

    result = validate(runners, val_loader, module=final, reference="pytorch_fp32", output_names=settings.output_names)
    passed, failures = gate(result, settings.max_metric_drop)
    sparsity = {
        **sparsity_summary(final),
        "pruned_layers": list(pruned_layers),
        "skipped": dict(skipped_layers or {}),
    }
    report = build_report(
        result,
        passed,
        failures,
        settings.max_metric_drop,
        precisions,
        sparsity,
        dict(quantization or {"precision": precision}),
        artifacts,
        notes,
    )
    paths = write_report(report, d)
    report["artifacts"].update({f"report.{k}": str(v) for k, v in paths.items()})
    if console:
        print_console(report)
    return report


def _maybe_build_engine(
    onnx_path: Path,
    d: Path,
    settings: ExportSettings,
    precision: str,
    sparse: bool,
    notes: list[str],
    artifacts: dict[str, str],
) -> Runner | None:
    from qatsparse.export.tensorrt import TensorRTRunner, build_engine, tensorrt_available

    if settings.build_engine is False:
        notes.append("TensorRT engine build disabled (build_engine=False)")
        return None
    if not tensorrt_available():
        if settings.build_engine is True:
            raise RuntimeError("build_engine=True but TensorRT (or a CUDA device) is not available")
        notes.append("TensorRT is not importable here: no engine was built and no TensorRT result is reported")
        return None
    plan = d / "model.plan"
    build_engine(
        onnx_path,
        plan,
        settings.batch_sizes,
        settings.workspace_gb,
        sparse_weights=sparse,
        precision=precision,
        timing_cache=d / "timing.cache",
    )
    artifacts["model.plan"] = str(plan)
    return TensorRTRunner(plan, "tensorrt", precision)
