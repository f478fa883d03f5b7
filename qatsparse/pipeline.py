"""Export -> lint -> (build) -> validate -> report, as pure functions over modules and a dataloader.

The export callback and the ``qatsparse export``/``validate`` commands call :func:`export_and_validate`
(new artifacts) and :func:`validate_artifacts` (artifacts already on disk).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from qatsparse.batches import Inputs, example_inputs, input_tensors
from qatsparse.batches import input_names as keyword_names
from qatsparse.export.onnx import (
    ABSENT_METADATA_KEY,
    FP16_QDQ_OPSET,
    atomic_path,
    default_input_names,
    export_onnx,
    get_metadata,
    record_pruned_layers,
    save_model,
)
from qatsparse.export.runners import OnnxRuntimeRunner, Runner, TorchRunner
from qatsparse.progress import QUIET, Progress
from qatsparse.quantization import prepare_for_onnx_export, quantizers, remove_quantizers
from qatsparse.report import build_report, print_console, write_report
from qatsparse.sparsity.check import onnx_sparsity_summary, sparsity_summary
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
    #: the user's metrics (see :func:`qatsparse.validation.metric_specs`); None = top-1 / MSE per output
    metrics: Any = None
    #: INT8 graphs: convert the non-quantized remainder to FP16 (strongly typed TensorRT runs it as typed)
    fp16_remainder: bool = True
    #: module names kept in FP32 in FP16 graphs, on top of the QAT report's ``keep_fp32``
    keep_fp32: list[str] = field(default_factory=list)
    #: run :func:`qatsparse.export.lint` on model.onnx before any build and put the findings in the report
    lint: bool = True
    #: persistent TensorRT timing cache (default: ``dirpath/timing.cache``)
    timing_cache: Path | None = None
    #: limit validation to this many batches (None: the whole dataloader)
    max_batches: int | None = None
    #: input axes besides the batch that may vary: ``"auto"`` (axis 1 of integer inputs is ``"sequence"``),
    #: None (batch only) or ``{input name: {axis: dim name}}`` (see :mod:`qatsparse.export.shapes`); the
    #: exported graphs carry them as ``dim_param`` (:func:`qatsparse.export.profile.onnx_input_dims`)
    dynamic_axes: Any = "auto"
    #: (min, opt, max) of dynamic dims other than the batch, by their ONNX ``dim_param`` name (TensorRT profile)
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: write the TensorRT hand-off bundle (``dirpath/tensorrt/``: build.sh, check.sh, a validation batch, outputs)
    handoff: bool = True
    #: ONNX Runtime graph-optimization level validation uses: ``"auto"`` (the default level unless it changes
    #: the graph's outputs, then none) or a fixed one (:mod:`qatsparse.export.ort_level`)
    ort_graph_optimization: str = "auto"


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


def _torch_precision(precision: str) -> str:
    return {"int8": "int8 (fake-quant)", "fp16": "fp16 (fake-cast)"}.get(precision, precision)


def _example(final: nn.Module, val_loader: Any) -> tuple[Inputs, list[str] | None]:
    """Example inputs (``example_input_array``, else the first validation batch's inputs) and the input
    names that keyword inputs give."""
    inputs = example_inputs(final, val_loader)
    return inputs, keyword_names(inputs)


def onnx_io_names(path: str | Path) -> tuple[list[str], list[str]]:
    """Input and output names of an ONNX graph (initializers excluded)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return [i.name for i in g.input if i.name not in inits], [o.name for o in g.output]


def onnx_precision(path: str | Path) -> str:
    """``"int8+fp16"``, ``"int8"``, ``"fp16"`` or ``"fp32"``: what the graph computes in.

    Example:
        >>> import tempfile
        >>> onnx_precision(export_onnx(nn.Linear(2, 2), [torch.zeros(1, 2)], tempfile.mkdtemp() + "/m.onnx"))
        'fp32'
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    qdq = any(n.op_type == "QuantizeLinear" for n in m.graph.node)
    fp16 = any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
        for n in m.graph.node
    )
    if qdq:
        return "int8+fp16" if fp16 else "int8"
    return "fp16" if fp16 else "fp32"


def _write_fp16(
    src: Path, dst: Path, keep_fp32: Sequence[str], notes: list[str], problems: list[str] | None = None
) -> None:
    import onnx

    from qatsparse.export.fp16 import convert_to_fp16

    proto, info = convert_to_fp16(onnx.load(str(src)), keep_fp32=keep_fp32)
    save_model(proto, dst)
    if problems is not None:
        problems += [
            f"{dst.name}: FP16 changed the numbers of {p} -- keep those layers in FP32 (keep_fp32=[...]) or fix "
            "the training that produced them"
            for p in info.problems
        ]
    if info.kept_fp32_nodes:
        notes.append(f"{len(info.kept_fp32_nodes)} node(s) of {list(keep_fp32)} kept in FP32 in {dst.name}")
    if info.missing_modules:
        notes.append(f"keep_fp32 modules with no node in {dst.name}: {info.missing_modules}")
    notes += [f"{dst.name}: {n}" for n in info.notes]


def _dynamic_axes(
    fp32: nn.Module,
    inputs: Inputs,
    in_names: list[str],
    settings: ExportSettings,
    path: Path,
    notes: list[str],
) -> dict[str, dict[int, str]]:
    """Export the FP32 graph with the resolved dynamic axes and check them (ONNX Runtime at another size).

    A declared axis the graph does not honour is an error; one found by convention is dropped (the graph is
    exported again with the example's size there) and the notes say so. Returns the axes that hold.
    """
    from qatsparse.export.shapes import check_dynamic_axes, dynamic_axes_of, resolve_axes

    tensors = input_tensors(inputs)  # keyword inputs: the graph's inputs are the dict's values, in order
    axes, declared = resolve_axes(settings.dynamic_axes, tensors, in_names)
    names = {"input_names": in_names, "output_names": settings.output_names}
    export_onnx(fp32, inputs, path, opset=settings.opset, dynamic_axes=axes, **names)
    problems = check_dynamic_axes(path, tensors, dynamic_axes_of(path)) if axes else {}
    if problems and declared:
        raise ValueError(
            "the exported graph does not accept other sizes of the declared dynamic axes: "
            + "; ".join(f"{dim}: {why}" for dim, why in problems.items())
            + " (the model's forward fixes that size, e.g. a reshape from a Python int: drop it from dynamic_axes)"
        )
    if problems:
        axes = {n: {a: dim for a, dim in ax.items() if dim not in problems} for n, ax in axes.items()}
        axes = {n: ax for n, ax in axes.items() if ax}
        notes.append(
            f"dynamic axes {sorted(problems)} (found by convention) dropped: the graph fixes their size "
            f"({next(iter(problems.values()))})"
        )
        export_onnx(fp32, inputs, path, opset=settings.opset, dynamic_axes=axes, **names)
    if axes:
        desc = ", ".join(f"{n}[{a}]={dim!r}" for n, ax in axes.items() for a, dim in ax.items())
        how = "declared" if declared else "convention: axis 1 of integer inputs"
        notes.append(f"dynamic axes besides the batch: {desc} ({how}); ONNX Runtime ran them at another size")
    return axes


def export_artifacts(
    final: nn.Module,
    inputs: Inputs,
    settings: ExportSettings,
    pruned_layers: Sequence[str] = (),
    keep_fp32: Sequence[str] = (),
    notes: list[str] | None = None,
    input_names: Sequence[str] | None = None,
    problems: list[str] | None = None,
) -> dict[str, Path]:
    """Write ``model_fp32.onnx`` and the deployable ``model.onnx`` for ``final``'s precision.

    ``problems`` collects what the export itself got wrong and must fail the report (or warn, per
    ``on_fail``): FP16 constants clamped, flushed or raised in a layer's weights, normalization or Q/DQ scales.

    INT8 (fake-quantized) models give a Q/DQ graph -- exported at opset >= 19 and with the rest of the
    graph in FP16 when ``settings.fp16_remainder`` (Q/DQ in FP16 need opset 19); FP16 models give the
    FP32 graph converted to FP16 with casts at the I/O and ``keep_fp32`` modules left in FP32; FP32
    models give a copy of the FP32 graph. Every file is written atomically; the pruned layers are
    recorded in both graphs' metadata.
    """
    notes = notes if notes is not None else []
    d = Path(settings.dirpath)
    d.mkdir(parents=True, exist_ok=True)
    final = plain_copy(final)
    precision = _precision(final)
    fp32 = remove_quantizers(copy.deepcopy(final))
    in_names = (
        settings.input_names
        or list(input_names or keyword_names(inputs) or [])
        or default_input_names(final, len(inputs))
    )
    fp32_path = d / "model_fp32.onnx"
    axes = _dynamic_axes(fp32, inputs, in_names, settings, fp32_path, notes)
    names = {"input_names": in_names, "output_names": settings.output_names, "dynamic_axes": axes}
    deploy = d / "model.onnx"
    if precision == "int8":
        qdq = copy.deepcopy(final)
        prepare_for_onnx_export(qdq)
        opset = max(settings.opset, FP16_QDQ_OPSET) if settings.fp16_remainder else settings.opset
        if opset != settings.opset:
            notes.append(f"model.onnx uses opset {opset}: FP16 Q/DQ needs opset >= {FP16_QDQ_OPSET}")
        if settings.fp16_remainder:
            tmp_qdq = d / ".model_qdq_fp32.onnx"
            try:
                export_onnx(qdq, inputs, tmp_qdq, opset=opset, **names)
                _write_fp16(tmp_qdq, deploy, keep_fp32, notes, problems)
            finally:
                tmp_qdq.unlink(missing_ok=True)
        else:
            export_onnx(qdq, inputs, deploy, opset=opset, **names)
    elif precision == "fp16":
        _write_fp16(fp32_path, deploy, keep_fp32, notes, problems)
    else:
        with atomic_path(deploy) as tmp:
            shutil.copyfile(fp32_path, tmp)
        notes.append("no quantization callback ran: model.onnx is the FP32 graph")
    if pruned_layers:
        record_pruned_layers(fp32_path, list(pruned_layers), model=fp32, inputs=inputs)
        record_pruned_layers(deploy, list(pruned_layers), model=final, inputs=inputs)
        absent = json.loads(get_metadata(deploy).get(ABSENT_METADATA_KEY, "{}"))
        if absent:
            notes.append(
                f"{len(absent)} pruned layer(s) have no node in {deploy.name} (TensorRT never runs them): "
                + "; ".join(f"{k}: {why}" for k, why in list(absent.items())[:8])
                + ("; ..." if len(absent) > 8 else "")
            )
    return {"model_fp32.onnx": fp32_path, "model.onnx": deploy}


def _profile(onnx_path: Path, settings: ExportSettings, inputs: Sequence[torch.Tensor], notes: list[str]) -> dict:
    """The optimization profile of ``onnx_path``'s inputs (batch: ``settings.batch_sizes``; other dynamic dims:
    ``settings.dim_ranges``, else the size they have in ``inputs``)."""
    from qatsparse.export.profile import onnx_input_dims, profile_shapes

    dims = onnx_input_dims(onnx_path)
    example = {n: tuple(t.shape) for n, t in zip(dims, inputs)}
    return profile_shapes(dims, settings.batch_sizes, settings.dim_ranges, example, notes)


def _maybe_build_engine(
    onnx_path: Path,
    d: Path,
    settings: ExportSettings,
    precision: str,
    sparse: bool,
    inputs: Sequence[torch.Tensor],
    notes: list[str],
    artifacts: dict[str, str],
    progress: Progress = QUIET,
) -> tuple[Runner | None, dict[str, Any] | None]:
    from qatsparse.export.engine_info import engine_precision_label
    from qatsparse.export.tensorrt import TensorRTRunner, build_engine, tensorrt_available

    if settings.build_engine is False:
        notes.append("TensorRT engine build disabled (build_engine=False)")
        return None, None
    if not tensorrt_available():
        if settings.build_engine is True:
            raise RuntimeError("build_engine=True but TensorRT (or a CUDA device) is not available")
        notes.append(
            "TensorRT is not importable here: no engine was built and no TensorRT result is reported; "
            f"{d / 'tensorrt'} holds build.sh and check.sh for a TensorRT machine"
        )
        return None, None
    plan = d / "model.plan"
    facts = build_engine(
        onnx_path,
        plan,
        settings.batch_sizes,
        settings.workspace_gb,
        sparse_weights=sparse,
        precision=precision,
        timing_cache=settings.timing_cache or d / "timing.cache",
        build_json=d / "build.json",
        dim_ranges=settings.dim_ranges,
        example_shapes={n: tuple(t.shape) for n, t in zip(onnx_io_names(onnx_path)[0], inputs)},
        progress=progress,
    )
    notes += facts.get("notes", [])
    artifacts["model.plan"] = str(plan)
    artifacts["build.json"] = str(d / "build.json")
    return TensorRTRunner(plan, "tensorrt", engine_precision_label(facts.get("inspector"))), facts


def _validation_batch(
    final: nn.Module, val_loader: Any, max_batch: int, graph_inputs: Sequence[str]
) -> tuple[tuple[torch.Tensor, ...], bool]:
    """The inputs of the first validation batch, cut to at most ``max_batch`` rows, in the graph's input order;
    and whether the model takes them as keywords (named as the graph's inputs)."""
    from qatsparse.batches import batch_inputs

    inputs = batch_inputs(final, next(iter(val_loader)))
    keywords = isinstance(inputs, Mapping)
    ordered = tuple(inputs[n] for n in graph_inputs) if keywords else inputs
    return tuple(t[:max_batch] for t in ordered), keywords


def _write_handoff(
    deploy: Path,
    settings: ExportSettings,
    final: nn.Module,
    val_loader: Any,
    runners: Sequence[Runner],
    pruned_layers: Sequence[str],
    notes: list[str],
    artifacts: dict[str, str],
    validate_command: str | None,
) -> dict[str, Any] | None:
    """Write ``dirpath/tensorrt/`` (see :mod:`qatsparse.export.handoff`); a failure is noted, not raised: the
    validation and the report still run."""
    from qatsparse.export.handoff import BUNDLE_DIR, write_bundle

    if not settings.handoff:
        return None
    try:
        graph_inputs = onnx_io_names(deploy)[0]
        batch, keywords = _validation_batch(final, val_loader, int(settings.batch_sizes[-1]), graph_inputs)
        shapes = _profile(deploy, settings, batch, notes)
        by_name = {r.name: r for r in runners}
        torch_runner = by_name.get("pytorch_qat") or by_name["pytorch_final"]
        if keywords:  # the bundle feeds the graph's inputs in order; the model takes them by name
            keyword_runner = torch_runner

            def torch_runner(ts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                return keyword_runner(dict(zip(graph_inputs, ts)))

        bundle = write_bundle(
            Path(settings.dirpath) / BUNDLE_DIR,
            deploy,
            batch,
            torch_runner,
            by_name["onnxruntime"],
            shapes,
            sparse_layers=pruned_layers,
            precision=onnx_precision(deploy),
            workspace_gb=settings.workspace_gb,
            validate_command=validate_command,
        )
    except Exception as e:  # the bundle must not cost the user the validation and the report
        notes.append(f"TensorRT hand-off bundle not written: {type(e).__name__}: {e}")
        return None
    artifacts.update({f"tensorrt/{k}": str(v) for k, v in bundle.files.items()})
    notes += bundle.notes
    return bundle.summary()


def _engine_facts(plan: Path) -> dict[str, Any] | None:
    """Build facts of an engine on disk: ``build.json`` beside it (qatsparse's build) or what build.sh left
    (trtexec's layer information and log)."""
    import json

    from qatsparse.export.engine_info import trtexec_build_facts

    build_json = plan.with_name("build.json")
    if build_json.is_file():
        return json.loads(build_json.read_text())
    return trtexec_build_facts(plan.parent)


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
    precision = _precision(final)
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
        see :func:`qatsparse.validation.enforce_gate`.
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
        bundle = _write_handoff(deploy, settings, final, val_loader, runners, pruned_layers, notes, artifacts,
                                validate_command)  # fmt: skip
        completed.append("handoff")
    if bundle is not None:
        extra["tensorrt_bundle"] = bundle
    graph_inputs = onnx_io_names(deploy)[0]
    example = tuple(inputs[n] for n in graph_inputs) if isinstance(inputs, Mapping) else inputs
    engine_runner, facts = _maybe_build_engine(
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
            facts = _engine_facts(plan)
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
