"""``ExportSettings``: where and how the export pipeline exports, builds, lints and gates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch


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
    #: the user's metrics (see :func:`qatsparse.metrics.metric_specs`); None = top-1 / MSE per output
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
