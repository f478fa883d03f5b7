"""The TensorRT stage of an export: build the engine where TensorRT is importable, write the hand-off bundle
(``dirpath/tensorrt/``) for the machine where it is not, and read the build facts of an engine on disk."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatsparse.artifacts import onnx_io_names, onnx_precision
from qatsparse.export.runners import Runner
from qatsparse.export_settings import ExportSettings
from qatsparse.progress import QUIET, Progress


def _profile(onnx_path: Path, settings: ExportSettings, inputs: Sequence[torch.Tensor], notes: list[str]) -> dict:
    """The optimization profile of ``onnx_path``'s inputs (batch: ``settings.batch_sizes``; other dynamic dims:
    ``settings.dim_ranges``, else the size they have in ``inputs``)."""
    from qatsparse.export.profile import onnx_input_dims, profile_shapes

    dims = onnx_input_dims(onnx_path)
    example = {n: tuple(t.shape) for n, t in zip(dims, inputs)}
    return profile_shapes(dims, settings.batch_sizes, settings.dim_ranges, example, notes)


def maybe_build_engine(
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
    """Build ``d/model.plan`` from ``onnx_path`` where TensorRT is importable and ``settings.build_engine`` allows
    it; returns its runner and build facts, or ``(None, None)`` with a note saying why no engine was built."""
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


def write_handoff(
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


def engine_facts(plan: Path) -> dict[str, Any] | None:
    """Build facts of an engine on disk: ``build.json`` beside it (qatsparse's build) or what build.sh left
    (trtexec's layer information and log)."""
    import json

    from qatsparse.export.engine_info import trtexec_build_facts

    build_json = plan.with_name("build.json")
    if build_json.is_file():
        return json.loads(build_json.read_text())
    return trtexec_build_facts(plan.parent)
