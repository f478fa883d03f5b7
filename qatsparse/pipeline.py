"""Export -> lint -> (build) -> validate -> report, as pure functions over modules and a dataloader.

The export callback and the ``qatsparse export``/``validate`` commands call :func:`export_and_validate`
(new artifacts) and :func:`validate_artifacts` (artifacts already on disk).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qatsparse.artifacts import export_artifacts, model_precision, onnx_io_names, onnx_precision, plain_copy
from qatsparse.batches import Inputs, example_inputs
from qatsparse.batches import input_names as keyword_names
from qatsparse.engine_stage import engine_facts, maybe_build_engine, write_handoff
from qatsparse.export.runners import OnnxRuntimeRunner, Runner, TorchRunner
from qatsparse.export_settings import ExportSettings
from qatsparse.gate import gate
from qatsparse.progress import QUIET, Progress
from qatsparse.quantization import remove_quantizers
from qatsparse.report import build_report, print_console, write_report
from qatsparse.sparsity.check import onnx_sparsity_summary, sparsity_summary
from qatsparse.validation import validate

__all__ = [
    "ExportSettings",
    "export_and_validate",
    "export_artifacts",
    "onnx_io_names",
    "onnx_precision",
    "plain_copy",
    "validate_artifacts",
]


def _torch_precision(precision: str) -> str:
    return {"int8": "int8 (fake-quant)", "fp16": "fp16 (fake-cast)"}.get(precision, precision)


def _example(final: nn.Module, val_loader: Any) -> tuple[Inputs, list[str] | None]:
    """Example inputs (``example_input_array``, else the first validation batch's inputs) and the input
    names that keyword inputs give."""
    inputs = example_inputs(final, val_loader)
    return inputs, keyword_names(inputs)


def _lint(path: Path, settings: ExportSettings, notes: list[str]) -> list[dict[str, str]]:
    if not settings.lint:
        return []
    from qatsparse.export.lint import lint

    findings = [f.to_dict() for f in lint(path)]
    if findings:
        errors = sum(f["severity"] == "error" for f in findings)
        notes.append(f"ONNX lint of {path.name}: {len(findings)} finding(s), {errors} error(s) (see 'lint')")
    return findings


def _onnxruntime(
    path: Path, final: nn.Module, val_loader: Any, settings: ExportSettings, notes: list[str], extra: dict[str, Any]
) -> OnnxRuntimeRunner:
    """The ONNX Runtime runner of ``path`` at the graph-optimization level chosen on the first validation
    batch (:func:`~qatsparse.export.ort_level.choose_graph_optimization`); the level and why go into the
    report (``report["onnxruntime"]`` and a note)."""
    from qatsparse.batches import batch_inputs
    from qatsparse.export.ort_level import choose_graph_optimization

    inputs = batch_inputs(final, next(iter(val_loader)))
    choice = choose_graph_optimization(path, inputs, settings.ort_graph_optimization, onnx_io_names(path)[1])
    extra["onnxruntime"] = choice.to_dict()
    notes.append(f"ONNX Runtime ran {path.name} at graph optimization level {choice.level!r}: {choice.why}")
    return OnnxRuntimeRunner(path, "onnxruntime", onnx_precision(path), optimization=choice.level)


def _validate_and_report(
    runners: list[Runner],
    final: nn.Module,
    val_loader: Any,
    settings: ExportSettings,
    output_names: list[str],
    pruned_layers: Sequence[str],
    skipped_layers: Mapping[str, str] | None,
    quantization: Mapping[str, Any],
    artifacts: dict[str, str],
    notes: list[str],
    extra: dict[str, Any],
    console: bool,
    progress: Progress = QUIET,
    completed: list[str] | None = None,
    sparsity_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    completed = completed if completed is not None else []
    precisions = {r.name: r.precision for r in runners}
    result = validate(
        runners,
        val_loader,
        module=final,
        reference="pytorch_fp32",
        output_names=output_names,
        metrics=settings.metrics,
        max_batches=settings.max_batches,
        progress=progress,
    )
    completed.append("validation")
    passed, failures = gate(result, settings.max_metric_drop)
    export_problems = list(extra.get("export_problems") or [])
    passed, failures = passed and not export_problems, [*failures, *export_problems]
    sparsity = {
        **sparsity_summary(final),
        "pruned_layers": list(pruned_layers),
        "skipped": dict(skipped_layers or {}),
        **(sparsity_extra or {}),
    }
    report = build_report(
        result,
        passed,
        failures,
        settings.max_metric_drop,
        precisions,
        sparsity,
        dict(quantization),
        artifacts,
        notes,
        extra,
        backend_sparsity=_backend_sparsity(runners, extra.get("engine")),
    )
    d = Path(settings.dirpath)
    report["artifacts"].update({f"report.{k}": str(d / f"report.{k}") for k in ("json", "md", "png")})
    write_report(report, d)
    completed.append("report")
    if console:
        print_console(report)
    return report


def _backend_sparsity(runners: Sequence[Runner], engine: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """What each backend runs, measured on what it runs: the PyTorch modules, the ONNX graph ONNX Runtime
    loads, and for TensorRT the layers its build log says picked sparse kernels."""
    out: dict[str, dict[str, Any]] = {}
    for r in runners:
        if isinstance(r, TorchRunner):
            out[r.name] = {**sparsity_summary(r.module), "measured_on": "pytorch module"}
        elif isinstance(r, OnnxRuntimeRunner):
            out[r.name] = {**onnx_sparsity_summary(r.path), "measured_on": f"onnx graph {r.path.name}"}
        elif engine is not None:
            sp = engine.get("sparsity") or {}
            picked = sp.get("picked")
            out[r.name] = {
                "sparse_layers_picked": None if picked is None else len(picked),
                "sparse_layers_eligible": None if sp.get("eligible") is None else len(sp["eligible"]),
                "measured_on": f"engine ({sp.get('source', 'unknown')})",
            }
    return out


def _torch_runners(
    final: nn.Module, reference: nn.Module | None, settings: ExportSettings
) -> tuple[nn.Module, str, list[Runner]]:
    """Plain copies of the final model and of the reference (the final model without quantizers when
    there is none), its precision, and the two PyTorch runners every validation starts with."""
    final = plain_copy(final)
    precision = model_precision(final)
    reference = plain_copy(reference) if reference is not None else remove_quantizers(copy.deepcopy(final))
    final_name = "pytorch_qat" if precision != "fp32" else "pytorch_final"
    runners: list[Runner] = [
        TorchRunner(reference, "pytorch_fp32", "fp32", settings.device),
        TorchRunner(final, final_name, _torch_precision(precision), settings.device),
    ]
    return final, precision, runners


def export_and_validate(
    final: nn.Module,
    reference: nn.Module | None,
    val_loader: Any,
    settings: ExportSettings,
    pruned_layers: Sequence[str] = (),
    skipped_layers: Mapping[str, str] | None = None,
    quantization: Mapping[str, Any] | None = None,
    console: bool = True,
    progress: Progress = QUIET,
    validate_command: str | None = None,
    completed: list[str] | None = None,
    sparsity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the ONNX files, the TensorRT hand-off bundle (and engine), lint, validate every backend on
    ``val_loader``, write the report.

    Args:
        final: the trained (possibly pruned and fake-quantized) model.
        reference: the dense FP32 model before compression; ``None`` uses the final model without
            its quantizers (nothing was compressed).
        val_loader: validation dataloader.
        settings: output folder, gate, metrics and build settings.
        pruned_layers: module names of the 2:4 layers (recorded in the ONNX metadata).
        skipped_layers: layers not pruned, with the reason (for the report).
        quantization: what the QAT callback reports (its ``keep_fp32`` modules stay FP32 in FP16 graphs).
        console: print the rich table.
        progress: shows the export, the engine build and each backend's validation (default: quiet).
        validate_command: the ``qatsparse validate ... --engine`` command the bundle's README gives.
        completed: the names of the stages that completed are appended to it (``export``, ``lint``,
            ``handoff``, ``engine``, ``validation``, ``report``): after a failure it says what succeeded.
        sparsity: more entries for the report's ``sparsity`` section (what
            :meth:`~qatsparse.TwoFourSparsity.kept_magnitude` returns: magnitude kept, permutation).

    Returns:
        The report dictionary (also written as report.json/md/png). The gate is not enforced here:
        see :func:`qatsparse.gate.enforce_gate`.
    """
    d = Path(settings.dirpath)
    d.mkdir(parents=True, exist_ok=True)
    inputs, dict_names = _example(final, val_loader)
    final, precision, runners = _torch_runners(final, reference, settings)
    quantization = dict(quantization or {"precision": precision})
    keep_fp32 = [*(quantization.get("keep_fp32") or []), *settings.keep_fp32]
    notes: list[str] = []

    completed = completed if completed is not None else []
    with progress.task("exporting ONNX", total=None):
        problems: list[str] = []
        paths = export_artifacts(
            final, inputs, settings, pruned_layers, keep_fp32, notes, input_names=dict_names, problems=problems
        )
        completed.append("export")
        deploy = paths["model.onnx"]
        _, output_names = onnx_io_names(deploy)
        artifacts = {k: str(v) for k, v in paths.items()}
        extra: dict[str, Any] = {"lint": _lint(deploy, settings, notes), "export_problems": problems}
        completed.append("lint")
        runners.append(_onnxruntime(deploy, final, val_loader, settings, notes, extra))
        bundle = write_handoff(deploy, settings, final, val_loader, runners, pruned_layers, notes, artifacts,
                                validate_command)  # fmt: skip
        completed.append("handoff")
    if bundle is not None:
        extra["tensorrt_bundle"] = bundle
    graph_inputs = onnx_io_names(deploy)[0]
    example = tuple(inputs[n] for n in graph_inputs) if isinstance(inputs, Mapping) else inputs
    engine_runner, facts = maybe_build_engine(
        deploy, d, settings, precision, bool(pruned_layers), example, notes, artifacts, progress
    )
    completed.append("engine")
    if engine_runner is not None:
        runners.append(engine_runner)
        extra["engine"] = facts
    return _validate_and_report(
        runners,
        final,
        val_loader,
        settings,
        output_names,
        pruned_layers,
        skipped_layers,
        quantization,
        artifacts,
        notes,
        extra,
        console,
        progress,
        completed,
        sparsity_extra=sparsity,
    )


def validate_artifacts(
    final: nn.Module,
    reference: nn.Module | None,
    val_loader: Any,
    settings: ExportSettings,
    onnx_path: str | Path | None = None,
    engine_path: str | Path | None = None,
    pruned_layers: Sequence[str] = (),
    skipped_layers: Mapping[str, str] | None = None,
    quantization: Mapping[str, Any] | None = None,
    console: bool = True,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Re-run validation on artifacts already on disk and rewrite ``report.{json,md,png}`` in ``settings.dirpath``.

    Args:
        final: the trained model (e.g. restored from a checkpoint with its quantizers).
        reference: the dense FP32 reference; ``None`` uses ``final`` without quantizers.
        val_loader: validation dataloader.
        settings: output folder, gate and metric settings.
        onnx_path: the ONNX to validate (default ``dirpath/model.onnx`` when it exists).
        engine_path: the TensorRT engine (default ``dirpath/model.plan`` when it exists and TensorRT is
            importable). Naming one explicitly where TensorRT is not importable is an error.
        pruned_layers, skipped_layers, quantization: as in :func:`export_and_validate` (for the report).
        console: print the rich table.
        progress: shows each backend's validation (default: quiet).

    An engine built by the hand-off bundle's ``build.sh`` (trtexec) is described in the report from the
    layer information and log it left beside the engine; one built by qatsparse from its ``build.json``.

    Raises:
        FileNotFoundError: a named artifact does not exist.
        RuntimeError: ``engine_path`` was given but TensorRT or a GPU is not available.
    """
    from qatsparse.export.engine_info import engine_precision_label
    from qatsparse.export.tensorrt import TensorRTRunner, tensorrt_available

    d = Path(settings.dirpath)
    d.mkdir(parents=True, exist_ok=True)
    final, precision, runners = _torch_runners(final, reference, settings)
    notes: list[str] = []
    artifacts: dict[str, str] = {}
    extra: dict[str, Any] = {}
    onnx_file = Path(onnx_path) if onnx_path else d / "model.onnx"
    output_names = settings.output_names
    if onnx_path and not onnx_file.exists():
        raise FileNotFoundError(f"no ONNX file at {onnx_file}")
    if onnx_file.exists():
        runners.append(_onnxruntime(onnx_file, final, val_loader, settings, notes, extra))
        artifacts["model.onnx"] = str(onnx_file)
        output_names = onnx_io_names(onnx_file)[1]
        extra["lint"] = _lint(onnx_file, settings, notes)
    else:
        notes.append(f"no ONNX file at {onnx_file}: ONNX Runtime not validated")
    plan = Path(engine_path) if engine_path else d / "model.plan"
    if engine_path and not plan.exists():
        raise FileNotFoundError(f"no TensorRT engine at {plan}")
    if plan.exists():
        if tensorrt_available():
            facts = engine_facts(plan)
            runners.append(TensorRTRunner(plan, "tensorrt", engine_precision_label((facts or {}).get("inspector"))))
            artifacts["model.plan"] = str(plan)
            if facts is not None:
                extra["engine"] = facts
        elif engine_path:
            raise RuntimeError(f"engine {plan} given but TensorRT (or a CUDA device) is not available here")
        else:
            notes.append(f"{plan} exists but TensorRT is not importable here: not validated")
    return _validate_and_report(
        runners,
        final,
        val_loader,
        settings,
        output_names,  # type: ignore[arg-type]
        pruned_layers,
        skipped_layers,
        dict(quantization or {"precision": precision}),
        artifacts,
        notes,
        extra,
        console,
        progress,
    )
