"""TensorRT engine build and runner, written against the documented Python API of 10.x and 11.x.

``tensorrt`` is an optional dependency imported lazily: nothing here runs where it is absent, and no
TensorRT result is ever produced by anything but TensorRT.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


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


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    batch_sizes: Sequence[int] = (1, 32, 256),
    workspace_gb: float = 4.0,
    sparse_weights: bool = True,
    precision: str = "int8",
    timing_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Build a serialized engine from an ONNX file; returns build facts (also for ``build.json``).

    Strongly typed network on TensorRT >= 10.12 and 11.x (precision comes from the graph: Q/DQ and
    casts); below 10.12 the weakly typed path with the FP16/INT8 builder flags. ``SPARSE_WEIGHTS``
    lets TensorRT pick sparse kernels for 2:4 layers. One optimization profile spans
    ``batch_sizes = (min, opt, max)`` on every input's first axis.
    """
    trt = _trt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if len(batch_sizes) != 3 or not batch_sizes[0] <= batch_sizes[1] <= batch_sizes[2]:
        raise ValueError(f"batch_sizes must be (min, opt, max) with min <= opt <= max, got {batch_sizes}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    version = _version_tuple(trt.__version__)
    strongly_typed = version >= (10, 12)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n" + "\n".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    set_flags = []
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        set_flags.append("SPARSE_WEIGHTS")
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        set_flags.append("FP16")
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            set_flags.append("INT8")
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = tuple(t.shape)[1:]
        if any(d < 0 for d in rest):
            raise ValueError(f"input {t.name} has dynamic non-batch dims {tuple(t.shape)}; only batch may vary")
        profile.set_shape(t.name, *[(b, *rest) for b in batch_sizes])
    config.add_optimization_profile(profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(cache.serialize()))
    return {
        "tensorrt": trt.__version__,
        "strongly_typed": strongly_typed,
        "flags": set_flags,
        "batch_sizes": list(batch_sizes),
        "workspace_gb": workspace_gb,
        "build_seconds": round(seconds, 3),
        "engine_bytes": plan_path.stat().st_size,
    }


class TensorRTRunner:
    """Runs a serialized engine with ``execute_async_v3``, tensors bound by name, torch CUDA buffers.

    Example (needs TensorRT and a GPU):
        >>> runner = TensorRTRunner("export/model.plan")  # doctest: +SKIP
        >>> outputs = runner((torch.randn(8, 1, 8, 8),))  # doctest: +SKIP
    """

    def __init__(self, plan_path: str | Path, name: str = "tensorrt", precision: str = "engine") -> None:
        trt = _trt()
        self.name, self.precision = name, precision
        self._trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.input_names = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int8: torch.int8,
            trt.bool: torch.bool,
        }
        if hasattr(trt, "int64"):
            table[trt.int64] = torch.int64
        return table[self.engine.get_tensor_dtype(name)]

    def run_device(self, inputs: Sequence[torch.Tensor], stream: torch.cuda.Stream | None = None) -> list[torch.Tensor]:
        """Run on CUDA tensors already on the device; returns CUDA output tensors."""
        stream = stream or torch.cuda.current_stream()
        for name, t in zip(self.input_names, inputs):
            t = t.to(device="cuda", dtype=self._torch_dtype(name)).contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, int(t.data_ptr()))
        outputs = []
        for name in self.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, int(out.data_ptr()))
            outputs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return outputs

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"engine takes {len(self.input_names)} inputs, got {len(inputs)}")
        dev = [t.to("cuda", non_blocking=True) for t in inputs]  # keep the inputs alive during the run
        outs = self.run_device(dev)
        torch.cuda.current_stream().synchronize()
        return tuple(o.float().cpu() for o in outs)
