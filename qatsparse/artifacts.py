"""The ONNX artifacts of an export: ``model_fp32.onnx`` and the deployable ``model.onnx`` (Q/DQ INT8 or FP16),
written from a plain copy of the trained model, with the dynamic axes checked; what an ONNX file on disk takes,
gives and computes in."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from qatsparse.batches import Inputs, input_tensors
from qatsparse.batches import input_names as keyword_names
from qatsparse.export.atomic import atomic_path
from qatsparse.export.metadata import ABSENT_METADATA_KEY, get_metadata, record_pruned_layers
from qatsparse.export.onnx import FP16_QDQ_OPSET, default_input_names, export_onnx, save_model
from qatsparse.export_settings import ExportSettings
from qatsparse.quantization import prepare_for_onnx_export, quantizers, remove_quantizers


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy on the CPU in FP32 eval mode, without ``LightningModule.compile()``'s wrapper (the
    copied wrapper would still call the original module)."""
    module = copy.deepcopy(module).cpu().float().eval()
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return module


def model_precision(model: nn.Module) -> str:
    """``"int8"``, ``"fp16"`` (the model's quantizers) or ``"fp32"`` (none)."""
    qs = list(quantizers(model).values())
    return qs[0].precision if qs else "fp32"


def onnx_io_names(path: str | Path) -> tuple[list[str], list[str]]:
    """Input and output names of an ONNX graph (initializers excluded)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return [i.name for i in g.input if i.name not in inits], [o.name for o in g.output]


def onnx_precision(path: str | Path) -> str:
    """``"int8+fp16"``, ``"int8"``, ``"fp16"`` or ``"fp32"``: what the graph computes in.

    Example:
        >>> import tempfile, torch
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
    precision = model_precision(final)
    fp32 = remove_quantizers(copy.deepcopy(final))
    in_names = (
        settings.input_names
        or list(input_names or keyword_names(inputs) or [])
        or default_input_names(final, len(inputs))
    )
    fp32_path = d / "model_fp32.onnx"
    axes = _dynamic_axes(fp32, inputs, in_names, settings, fp32_path, notes)
    if pruned_layers:
        record_pruned_layers(fp32_path, list(pruned_layers), model=fp32, inputs=inputs)
    del fp32  # one copy of the weights fewer while model.onnx is exported (large models: host memory)
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
                export_onnx(qdq, inputs, tmp_qdq, opset=opset, copy_model=False, **names)
                del qdq
                _write_fp16(tmp_qdq, deploy, keep_fp32, notes, problems)
            finally:
                tmp_qdq.unlink(missing_ok=True)
        else:
            export_onnx(qdq, inputs, deploy, opset=opset, copy_model=False, **names)
    elif precision == "fp16":
        _write_fp16(fp32_path, deploy, keep_fp32, notes, problems)
    else:
        with atomic_path(deploy) as tmp:
            shutil.copyfile(fp32_path, tmp)
        notes.append("no quantization callback ran: model.onnx is the FP32 graph")
    if pruned_layers:
        record_pruned_layers(deploy, list(pruned_layers), model=final, inputs=inputs)
        absent = json.loads(get_metadata(deploy).get(ABSENT_METADATA_KEY, "{}"))
        if absent:
            notes.append(
                f"{len(absent)} pruned layer(s) have no node in {deploy.name} (TensorRT never runs them): "
                + "; ".join(f"{k}: {why}" for k, why in list(absent.items())[:8])
                + ("; ..." if len(absent) > 8 else "")
            )
    return {"model_fp32.onnx": fp32_path, "model.onnx": deploy}
