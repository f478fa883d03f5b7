"""TensorRT: the engine build and the engine inspector (10.x and 11.x).

``tensorrt`` is an optional dependency imported lazily (:mod:`qatsparse.export.trt_loader`, with the one
process-wide logger): nothing here runs where it is absent, and no TensorRT result is ever produced by anything
but TensorRT. What TensorRT prints is parsed by the pure functions of :mod:`qatsparse.export.engine_info`; the
optimization profile comes from :mod:`qatsparse.export.profile`; engines run in
:class:`~qatsparse.export.trt_runner.TensorRTRunner` (re-exported here). Every TensorRT call used here and there
is listed, with where it is documented, in ``docs/export.md``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qatsparse.export.engine_info import (  # noqa: F401 -- re-exported: the parsers' historical home
    engine_precision_label,
    engine_sparsity,
    normalize_dtype,
    parse_engine_information,
    parse_sparsity_log,
)
from qatsparse.export.profile import onnx_input_dims, profile_shapes
from qatsparse.export.trt_loader import import_tensorrt, tensorrt_available, trt_logger
from qatsparse.export.trt_runner import TensorRTRunner

__all__ = [
    "SUPPORTED_TENSORRT",
    "TensorRTRunner",
    "attach_timing_cache",
    "build_engine",
    "inspect_engine",
    "tensorrt_available",
    "trt_logger",
]

#: TensorRT releases this module is written against (Python bindings and headers read for each).
SUPPORTED_TENSORRT = ("10.0", "11.1")


# ------------------------------------------------------------------------------------ the build
def attach_timing_cache(config: Any, cache_path: Path | None) -> tuple[Any, dict[str, Any]]:
    """Give ``config`` a timing cache: the one at ``cache_path`` when it loads and fits this device, else a
    fresh one. Returns the cache (keep it alive until the build ends) and what happened.

    ``create_timing_cache`` returns None for bytes it cannot read (a corrupt or truncated file) and
    ``set_timing_cache(cache, ignore_mismatch=False)`` returns False for a cache made on another device or
    TensorRT version; both fall back to a fresh cache, which the build then writes back.
    """
    info: dict[str, Any] = {"path": str(cache_path) if cache_path else None, "loaded": False}
    cache = None
    if cache_path is not None and cache_path.is_file() and cache_path.stat().st_size:
        try:
            cache = config.create_timing_cache(cache_path.read_bytes())
        except Exception as e:
            cache, info["error"] = None, f"{type(e).__name__}: {e}"
        if cache is None:
            info["ignored"] = "TensorRT could not read the timing cache (corrupt?); a fresh one is used"
        elif not config.set_timing_cache(cache, ignore_mismatch=False):
            cache = None
            info["ignored"] = "the timing cache was made on another device or TensorRT version; a fresh one is used"
        else:
            info["loaded"] = True
    if cache is None:
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise RuntimeError("TensorRT could not create an empty timing cache")
    return cache, info


def _progress_monitor(trt: Any, advance: Callable[[str, int, int], None]) -> Any | None:
    """A ``trt.IProgressMonitor`` reporting the top-level build phases through ``advance(phase, step, steps)``."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.steps: dict[str, int] = {}
            self.top: set[str] = set()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                self.steps[phase_name] = int(num_steps)
                if parent_phase is None:
                    self.top.add(phase_name)
                    advance(phase_name, 0, int(num_steps))
            except Exception:  # pragma: no cover
                pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                if phase_name in self.top:
                    advance(phase_name, int(step) + 1, self.steps.get(phase_name, 0))
            except Exception:  # pragma: no cover
                pass
            return True  # keep building

        def phase_finish(self, phase_name: str) -> None:
            try:
                if phase_name in self.top:
                    n = self.steps.get(phase_name, 0)
                    advance(phase_name, n, n)
            except Exception:  # pragma: no cover
                pass

    return Monitor()


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    batch_sizes: Sequence[int] = (1, 32, 256),
    workspace_gb: float = 4.0,
    sparse_weights: bool = True,
    precision: str = "int8",
    timing_cache: str | Path | None = None,
    build_json: str | Path | None = None,
    verbose: bool = False,
    dim_ranges: Mapping[str, Sequence[int]] | None = None,
    example_shapes: Mapping[str, Sequence[int]] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Build ``plan_path`` from an ONNX file and write ``build.json`` beside it; returns the build facts.

    The network is strongly typed on every supported version (10.x: ``STRONGLY_TYPED``; 11.x: always):
    the precision comes from the graph (Q/DQ for INT8, casts and FP16 initializers for FP16), which the
    export already writes. ``precision`` is recorded only. ``SPARSE_WEIGHTS`` lets TensorRT time sparse
    kernels for 2:4 layers. One optimization profile: the batch axis spans ``batch_sizes = (min, opt, max)``,
    other dynamic dims ``dim_ranges`` (see :func:`qatsparse.export.profile.profile_shapes`).
    ``ProfilingVerbosity.DETAILED`` makes the engine inspector report per-layer precision; the timing cache
    at ``timing_cache`` is loaded when it is readable and fits this device, and saved after the build.

    Facts recorded: TensorRT/CUDA/GPU versions, network and builder flags, profile, timing cache, build
    seconds, engine bytes, per-layer precision (inspector), and the sparse layers: ``picked`` from the
    build log, ``eligible`` (log) and ``weights_qualify`` (inspector) separately.
    """
    from qatsparse.environment import device_info
    from qatsparse.export.atomic import atomic_path

    trt = import_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    build_json = Path(build_json) if build_json else plan_path.with_name("build.json")
    logger = trt_logger()
    notes: list[str] = []
    with logger.capture(verbose) as log_lines:
        builder = trt.Builder(logger)
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        network_flags = 1 << int(flag) if flag is not None else 0  # 11.x: exists and is ignored (always on)
        network = builder.create_network(network_flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n" + "\n".join(errors))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        builder_flags = []
        if sparse_weights:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
            builder_flags.append("SPARSE_WEIGHTS")
        shapes = profile_shapes(onnx_input_dims(onnx_path), batch_sizes, dim_ranges, example_shapes, notes)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        cache_path = Path(timing_cache) if timing_cache else None
        cache, cache_info = attach_timing_cache(config, cache_path)
        monitor = None
        if progress is not None:
            task = progress.task("building the TensorRT engine", total=None)
            monitor = _progress_monitor(
                trt, lambda phase, step, steps: task.update(step, steps, f"TensorRT build: {phase}")
            )
            if monitor is not None:
                config.progress_monitor = monitor
        t0 = time.perf_counter()
        try:
            plan = builder.build_serialized_network(network, config)
        finally:
            if progress is not None:
                task.close()
        seconds = time.perf_counter() - t0
        if plan is None:
            errors = [line for line in log_lines if "error" in line.lower()][-20:]
            raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}:\n" + "\n".join(errors))
        with atomic_path(plan_path) as tmp:
            tmp.write_bytes(bytes(plan))
        if cache_path is not None:
            serialized = config.get_timing_cache()
            if serialized is not None:
                with atomic_path(cache_path) as tmp:
                    tmp.write_bytes(bytes(serialized.serialize()))
        del cache
        inspection = inspect_engine(plan_path, {n: s[1] for n, s in shapes.items()})
    seen = bool(log_lines)  # a build always logs INFO lines; none means another logger came first
    if not seen:
        notes.append(
            "TensorRT's build log did not reach qatsparse's logger (another trt.ILogger was registered first in "
            "this process; TensorRT keeps the first): the layers that picked sparse kernels are unknown"
        )
    facts = {
        "tensorrt": trt.__version__,
        **{k: v for k, v in device_info().items() if k in ("cuda", "gpu", "driver", "compute_capability")},
        "built_by": "qatsparse (TensorRT Python API)",
        "onnx": str(onnx_path),
        "precision": precision,
        "strongly_typed": True,
        "network_flags": ["STRONGLY_TYPED"] if network_flags else [],
        "builder_flags": builder_flags,
        "profiling_verbosity": "DETAILED",
        "batch_sizes": list(batch_sizes),
        "profile": {n: [list(s) for s in v] for n, v in shapes.items()},
        "workspace_gb": workspace_gb,
        "timing_cache": cache_info,
        "build_seconds": round(seconds, 3),
        "engine_bytes": plan_path.stat().st_size,
        "inspector": inspection,
        "sparsity": engine_sparsity(log_lines if seen else None, inspection),
        "notes": notes,
    }
    with atomic_path(build_json) as tmp:
        tmp.write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def inspect_engine(plan_path: str | Path, input_shapes: Mapping[str, Sequence[int]]) -> dict:
    """Deserialize an engine and parse its inspector JSON (with an execution context at ``input_shapes``,
    so formats are resolved instead of "N/A due to dynamic shapes")."""
    trt = import_tensorrt()
    runtime = trt.Runtime(trt_logger())
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {plan_path}")
    context = engine.create_execution_context()
    for name, shape in input_shapes.items():
        context.set_input_shape(name, tuple(shape))
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return parse_engine_information(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
