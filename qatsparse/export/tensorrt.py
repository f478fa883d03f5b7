"""TensorRT engine build, inspection and runner, written against the documented Python API of 10.x and 11.x.

``tensorrt`` is an optional dependency imported lazily: nothing here runs where it is absent, and no
TensorRT result is ever produced by anything but TensorRT. The parsing of what TensorRT prints (build
log lines, engine-inspector JSON) is kept in pure functions so that it is tested without TensorRT.
Every TensorRT call used here is listed, with where it is documented, in ``docs/export.md``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# ------------------------------------------------------------------------------------ pure functions
_ELIGIBLE = re.compile(r"Layers eligible for sparse math:\s*(.*)$")
_PICKED = re.compile(r"picked sparse implementation for layers:\s*(.*)$")


def _split_layers(text: str) -> list[str]:
    return [s.strip() for s in text.strip().split(", ") if s.strip()]


def parse_sparsity_log(lines: Iterable[str]) -> dict[str, list[str]]:
    """The layer lists of TensorRT's two sparsity log lines (any prefix, several lines are merged).

    ``(Sparsity) Layers eligible for sparse math: a, b`` lists layers whose weights are 2:4;
    ``(Sparsity) TRT inference plan picked sparse implementation for layers: b`` lists those for which
    the sparse kernel was faster and kept -- eligible is not picked.

    Example:
        >>> parse_sparsity_log(["[I] (Sparsity) Layers eligible for sparse math: conv1, conv2",
        ...                     "[I] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2"])
        {'eligible': ['conv1', 'conv2'], 'picked': ['conv2']}
    """
    out: dict[str, list[str]] = {"eligible": [], "picked": []}
    for line in lines:
        for key, rx in (("eligible", _ELIGIBLE), ("picked", _PICKED)):
            m = rx.search(line.rstrip())
            if m:
                out[key] += [n for n in _split_layers(m.group(1)) if n not in out[key]]
    return out


_DTYPES = (  # order matters: the first match wins ("FP16" before "Float", "Int8" before "Int")
    ("int8", re.compile(r"\bint8\b", re.I)),
    ("fp16", re.compile(r"\b(fp16|half|float16)\b", re.I)),
    ("bf16", re.compile(r"\b(bf16|bfloat16)\b", re.I)),
    ("fp8", re.compile(r"\b(fp8|e4m3)\b", re.I)),
    ("fp4", re.compile(r"\b(fp4|e2m1)\b", re.I)),
    ("int4", re.compile(r"\bint4\b", re.I)),
    ("int32", re.compile(r"\bint32\b", re.I)),
    ("int64", re.compile(r"\bint64\b", re.I)),
    ("bool", re.compile(r"\bbool\b", re.I)),
    ("uint8", re.compile(r"\buint8\b", re.I)),
    ("fp32", re.compile(r"\b(fp32|float|float32)\b", re.I)),
)


def normalize_dtype(text: str | None) -> str:
    """TensorRT's data type spellings (``"Row major linear FP32"``, ``"Half"``, ``"Int8"``, ``"kHALF"``) -> a
    short name (``fp32``, ``fp16``, ``int8``, ...), ``"unknown"`` when none is recognised.

    Example:
        >>> normalize_dtype("Thirty-two wide channel vectorized row major Int8 format"), normalize_dtype("Half")
        ('int8', 'fp16')
    """
    if not text:
        return "unknown"
    t = str(text).replace("kHALF", "Half").replace("kFLOAT", "Float").replace("kINT8", "Int8")
    for name, rx in _DTYPES:
        if rx.search(t):
            return name
    return "unknown"


def _tensor_dtype(t: Any) -> str:
    """Data type of one tensor entry: 10.x ``"Format/Datatype"``, 11.x ``"Datatype"``/``"DataType"``."""
    if not isinstance(t, Mapping):
        return normalize_dtype(str(t))
    for key in ("Datatype", "DataType", "Format/Datatype"):
        if key in t:
            return normalize_dtype(str(t[key]))
    return "unknown"


def parse_engine_information(info: str | Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer precision and sparse weights from ``IEngineInspector.get_engine_information(JSON)``.

    Handles both layouts: 10.x gives each tensor a combined ``"Format/Datatype"`` string and lists the
    I/O names under ``"Bindings"``; 11.x gives separate ``"Datatype"`` and ``"Format"`` keys and an
    ``"I/O Tensors"`` list of objects. Without ``ProfilingVerbosity.DETAILED`` layers are bare names.

    A layer's precision is ``int8`` when any of its inputs or weights are INT8 (TensorRT ran an INT8
    kernel), else the type of its first output.

    Example:
        >>> r = parse_engine_information({"Layers": [{"Name": "conv", "LayerType": "CaskConvolution",
        ...     "Inputs": [{"Name": "x", "Format/Datatype": "Int8"}], "Outputs": [{"Name": "y",
        ...     "Format/Datatype": "Half"}], "HasSparseWeights": 1}], "Bindings": ["x", "y"]})
        >>> r["schema"], r["layers"][0]["precision"], r["sparse_layers"]
        ('10.x', 'int8', ['conv'])
    """
    data = json.loads(info) if isinstance(info, (str, bytes)) else dict(info)
    if "I/O Tensors" in data:
        schema = "11.x"
        io = [
            {
                "name": t.get("Name") if isinstance(t, Mapping) else str(t),
                "mode": t.get("IOMode", t.get("Mode")) if isinstance(t, Mapping) else None,
                "dtype": _tensor_dtype(t),
            }
            for t in data["I/O Tensors"]
        ]
    elif "Bindings" in data:
        schema = "10.x"
        io = [{"name": str(b), "mode": None, "dtype": "unknown"} for b in data["Bindings"]]
    else:
        schema, io = "unknown", []
    layers = []
    for layer in data.get("Layers", []):
        if not isinstance(layer, Mapping):  # names only (ProfilingVerbosity below DETAILED)
            layers.append({"name": str(layer), "type": None, "precision": "unknown", "sparse_weights": None})
            continue
        ins = [_tensor_dtype(t) for t in layer.get("Inputs", [])]
        outs = [_tensor_dtype(t) for t in layer.get("Outputs", [])]
        weights = layer.get("Weights")
        wtype = normalize_dtype(weights.get("Type")) if isinstance(weights, Mapping) else None
        first = outs[0] if outs else (ins[0] if ins else "unknown")
        precision = "int8" if "int8" in ins or wtype == "int8" else first
        sparse = layer.get("HasSparseWeights")
        layers.append(
            {
                "name": str(layer.get("Name", "")),
                "type": layer.get("LayerType"),
                "inputs": ins,
                "outputs": outs,
                "weights": wtype,
                "precision": precision,
                "sparse_weights": None if sparse is None else bool(int(sparse)),
                "tactic": layer.get("TacticName"),
            }
        )
    if schema == "unknown" and layers and any(isinstance(x, Mapping) for x in data.get("Layers", [])):
        schema = "11.x" if any("Datatype" in str(x) or "DataType" in str(x) for x in data["Layers"]) else "10.x"
    counts = Counter(layer["precision"] for layer in layers)
    return {
        "schema": schema,
        "io_tensors": io,
        "layers": layers,
        "precision_counts": dict(counts),
        "sparse_layers": [layer["name"] for layer in layers if layer.get("sparse_weights")],
    }


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())


def uses_strong_typing(version: str) -> bool:
    """Strongly typed networks on TensorRT >= 10.12 and 11.x; weak typing (FP16/INT8 flags) below.

    Example:
        >>> uses_strong_typing("10.11.0"), uses_strong_typing("10.12.0.36"), uses_strong_typing("11.1.0")
        (False, True, True)
    """
    return _version_tuple(version) >= (10, 12)


def profile_shapes(
    input_shapes: Mapping[str, Sequence[int]], batch_sizes: Sequence[int]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input for an optimization profile over the batch axis.

    Raises:
        ValueError: ``batch_sizes`` is not (min, opt, max) ordered, or an input has a dynamic non-batch
            axis or a static batch axis.

    Example:
        >>> profile_shapes({"planes": (-1, 18, 8, 8)}, (1, 32, 256))["planes"][2]
        (256, 18, 8, 8)
    """
    bs = tuple(int(b) for b in batch_sizes)
    if len(bs) != 3 or not 1 <= bs[0] <= bs[1] <= bs[2]:
        raise ValueError(f"batch_sizes must be (min, opt, max) with 1 <= min <= opt <= max, got {tuple(batch_sizes)}")
    out = {}
    for name, shape in input_shapes.items():
        shape = tuple(int(d) for d in shape)
        if not shape or shape[0] != -1:
            raise ValueError(f"input {name!r} has shape {shape}: export it with a dynamic batch axis (dims[0] = -1)")
        if any(d < 0 for d in shape[1:]):
            raise ValueError(
                f"input {name!r} has dynamic non-batch dims {shape}: give their (min, opt, max) in a profile "
                "(qatsparse.export.shapes.shape_profile; TensorRTExport(shape_ranges=...))"
            )
        out[name] = tuple((b, *shape[1:]) for b in bs)  # type: ignore[assignment]
    return out


# ------------------------------------------------------------------------------------ TensorRT calls
def tensorrt_available() -> bool:
    """True when ``import tensorrt`` works and a CUDA device is present."""
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError(
            "TensorRT is not installed: install the `tensorrt` extra from NVIDIA's package index "
            "(pip install 'qatsparse[tensorrt]' --extra-index-url https://pypi.nvidia.com)"
        ) from e
    return trt


def _capturing_logger(trt: Any, echo: bool) -> Any:
    """A ``trt.ILogger`` that keeps INFO-and-above lines (for the sparsity lists) and echoes warnings."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # required by the Python API for custom loggers
            self.lines: list[str] = []
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.INFO):
                self.lines.append(msg)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if echo or level <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {severity.name}: {msg}", file=sys.stderr)

    return CapturingLogger()


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
    profile: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> dict[str, Any]:
    """Build ``plan_path`` from an ONNX file and write ``build.json`` beside it; returns the build facts.

    Strongly typed network on TensorRT >= 10.12 and 11.x (precision comes from the graph: Q/DQ and
    casts); below 10.12 the weakly typed path with the FP16 (and, for ``precision="int8"``, INT8)
    builder flags. ``SPARSE_WEIGHTS`` lets TensorRT time sparse kernels for 2:4 layers. One
    optimization profile spans ``batch_sizes = (min, opt, max)`` on every input's first axis, or is
    ``profile`` (``{input: (min, opt, max) shapes}``, e.g. from :func:`qatsparse.export.shapes.shape_profile`,
    for dynamic axes beyond the batch).
    ``ProfilingVerbosity.DETAILED`` makes the engine inspector report per-layer precision and sparse
    weights; the timing cache at ``timing_cache`` is loaded when present and saved after the build.

    Facts recorded: TensorRT/CUDA/GPU versions, network and builder flags, build seconds, engine
    bytes, per-layer precision and sparse weights (inspector), and the two sparsity log lists.
    """
    from qatsparse.export.onnx import atomic_path
    from qatsparse.report import device_info

    trt = _trt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    build_json = Path(build_json) if build_json else plan_path.with_name("build.json")
    logger = _capturing_logger(trt, verbose)
    builder = trt.Builder(logger)
    strongly_typed = uses_strong_typing(trt.__version__)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network_flags = 1 << int(flag) if strongly_typed and flag is not None else 0
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
    if not strongly_typed and precision in ("fp16", "int8"):  # TensorRT < 10.12: precision from the flags
        config.set_flag(trt.BuilderFlag.FP16)
        builder_flags.append("FP16")
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            builder_flags.append("INT8")
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if profile:
        shapes = {n: tuple(tuple(int(d) for d in s) for s in v) for n, v in profile.items()}
    else:
        shapes = profile_shapes(inputs, batch_sizes)
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_loaded = bool(cache_path and cache_path.exists())
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_loaded else b"")  # type: ignore[union-attr]
    config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}:\n" + "\n".join(logger.errors[-20:]))
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(plan))
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))

    inspection = inspect_engine(plan_path, {n: s[1] for n, s in shapes.items()}, logger)
    facts = {
        "tensorrt": trt.__version__,
        **{k: v for k, v in device_info().items() if k in ("cuda", "gpu", "driver", "compute_capability")},
        "onnx": str(onnx_path),
        "precision": precision,
        "strongly_typed": strongly_typed,
        "network_flags": ["STRONGLY_TYPED"] if network_flags else [],
        "builder_flags": builder_flags,
        "profiling_verbosity": "DETAILED",
        "batch_sizes": list(batch_sizes),
        "profile": {n: [list(s) for s in v] for n, v in shapes.items()},
        "workspace_gb": workspace_gb,
        "timing_cache": {"path": str(cache_path) if cache_path else None, "loaded": cache_loaded},
        "build_seconds": round(seconds, 3),
        "engine_bytes": plan_path.stat().st_size,
        "inspector": inspection,
        "sparsity_log": parse_sparsity_log(logger.lines),
    }
    with atomic_path(build_json) as tmp:
        tmp.write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def inspect_engine(plan_path: str | Path, input_shapes: Mapping[str, Sequence[int]], logger: Any = None) -> dict:
    """Deserialize an engine and parse its inspector JSON (with an execution context at ``input_shapes``,
    so formats are resolved instead of "N/A due to dynamic shapes")."""
    trt = _trt()
    logger = logger or trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {plan_path}")
    context = engine.create_execution_context()
    for name, shape in input_shapes.items():
        context.set_input_shape(name, tuple(shape))
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return parse_engine_information(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


class TensorRTRunner:
    """Runs a serialized engine with ``execute_async_v3``, tensors bound by name, torch CUDA buffers.

    Any batch inside the engine's optimization profile works; inputs are matched to the engine's
    input tensors by position in the engine's I/O order (the ONNX input order) or by name through
    :meth:`run_named`.

    Example (needs TensorRT and a GPU):
        >>> runner = TensorRTRunner("export/model.plan")  # doctest: +SKIP
        >>> outputs = runner((torch.randn(8, 1, 8, 8),))  # doctest: +SKIP
    """

    def __init__(self, plan_path: str | Path, name: str = "tensorrt", precision: str = "engine") -> None:
        trt = _trt()
        self.name, self.precision = name, precision
        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.input_names = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        self.shape_range = {n: self._shape_range(n) for n in self.input_names}
        self.batch_range = {n: (lo[0], hi[0]) for n, (lo, hi) in self.shape_range.items()}

    def _shape_range(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        return tuple(int(d) for d in lo), tuple(int(d) for d in hi)

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8}
        for trt_name, torch_dtype in (("bool", torch.bool), ("int64", torch.int64), ("bfloat16", torch.bfloat16)):
            if hasattr(trt, trt_name):
                table[getattr(trt, trt_name)] = torch_dtype
        return table[self.engine.get_tensor_dtype(name)]

    def bind(self, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Set shapes and addresses for CUDA ``inputs``; returns (device inputs, fresh output buffers).

        The returned tensors must stay alive while the context runs (TensorRT keeps raw pointers).
        """
        if len(inputs) != len(self.input_names):
            raise ValueError(f"engine takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        dev_inputs = []
        for name, t in zip(self.input_names, inputs):
            lo, hi = self.shape_range[name]
            outside = [a for a, (n, a_lo, a_hi) in enumerate(zip(t.shape, lo, hi)) if not a_lo <= n <= a_hi]
            if outside:
                a = outside[0]
                what = "batch" if a == 0 else f"axis {a}"
                raise ValueError(
                    f"{what} {t.shape[a]} of {name!r} is outside the engine's profile [{lo[a]}, {hi[a]}] "
                    "(TensorRTExport(batch_sizes=..., shape_ranges=...) set it)"
                )
            t = t.to(device="cuda", dtype=self._torch_dtype(name)).contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, int(t.data_ptr()))
            dev_inputs.append(t)
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, int(out.data_ptr()))
            outputs.append(out)
        return dev_inputs, outputs

    def execute(self, stream: torch.cuda.Stream | None = None) -> None:
        """Enqueue one inference with the current bindings on ``stream`` (default: the current stream)."""
        stream = stream or torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def run_device(self, inputs: Sequence[torch.Tensor], stream: torch.cuda.Stream | None = None) -> list[torch.Tensor]:
        """Run on tensors already on the device; returns CUDA output tensors (enqueued, not synchronized)."""
        self._alive, outputs = self.bind(inputs)
        self.execute(stream)
        return outputs

    def run_named(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run with inputs given by tensor name; returns CPU float32 outputs by name."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"missing engine inputs {missing}; the engine takes {self.input_names}")
        outs = self((*(inputs[n] for n in self.input_names),))
        return dict(zip(self.output_names, outs))

    def timed_callable(
        self, inputs: Sequence[torch.Tensor], cuda_graph: bool = True
    ) -> tuple[Callable[[], None], bool]:
        """A zero-argument function that enqueues one inference on fixed device buffers, for benchmarking.

        With ``cuda_graph`` the enqueue is captured once into a CUDA graph and replayed (as trtexec does);
        if capture fails (some layers cannot be captured) it falls back to plain enqueues. Returns the
        function and whether a CUDA graph is used.
        """
        self._bench_buffers = self.bind(inputs)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            self.execute(stream)  # first enqueue after a shape change does the setup work; keep it out of the graph
        stream.synchronize()
        if cuda_graph:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    self.execute(torch.cuda.current_stream())
                return graph.replay, True
            except Exception as e:  # pragma: no cover - depends on the engine
                print(f"[qatsparse] CUDA graph capture of the TensorRT engine failed ({e}); timing plain enqueues")
        return (lambda: self.execute(torch.cuda.current_stream())), False

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        dev = [t.to("cuda", non_blocking=True) for t in inputs]
        outs = self.run_device(dev)
        torch.cuda.current_stream().synchronize()
        return tuple(o.float().cpu() for o in outs)
