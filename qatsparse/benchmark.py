"""Inference benchmark: latency (median/p90/p99) and throughput per batch size for every backend.

Backends: PyTorch eager FP32 and FP16 (channels_last where it is faster), PyTorch with QAT fake
quantization, ONNX Runtime and TensorRT (CUDA graphs). Inputs are put on the device before timing;
on CUDA each timed iteration is bracketed by CUDA events (only the inference is timed), after a warm-up.
CPU-only machines benchmark the backends they have and say so in ``notes``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from qatsparse.batches import as_outputs

BACKENDS = ("pytorch_fp32", "pytorch_fp16", "pytorch_qat", "onnxruntime", "tensorrt")


def _batch(inputs: Sequence[torch.Tensor], bs: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``inputs`` resized to batch ``bs`` along axis 0 (rows repeated), on ``device``."""
    out = []
    for t in inputs:
        idx = torch.arange(bs) % t.shape[0]
        out.append(t[idx].contiguous().to(device))
    return tuple(out)


def _stats(times_ms: list[float], bs: int) -> dict[str, Any]:
    a = np.asarray(times_ms)
    med = float(np.median(a))
    return {
        "latency_ms": {
            "median": med,
            "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()),
            "min": float(a.min()),
            "cv": float(a.std() / a.mean()) if a.mean() > 0 else 0.0,
        },
        "throughput_per_s": bs / (med / 1e3) if med > 0 else float("inf"),
        "iterations": len(times_ms),
    }


def time_callable(
    fn: Callable[[], Any],
    device: torch.device,
    warmup_s: float = 0.2,
    min_time_s: float = 1.0,
    min_iters: int = 10,
    max_time_s: float = 10.0,
    max_iters: int = 10_000,
) -> list[float]:
    """Milliseconds per call of ``fn`` after a warm-up: CUDA events around each call on CUDA (the
    inference only, synchronised after each), ``perf_counter`` on the CPU. Runs at least ``min_iters``
    calls and ``min_time_s`` seconds, stopping at ``max_time_s`` (but never before 3 calls).

    Example:
        >>> len(time_callable(lambda: None, torch.device("cpu"), 0.0, 0.0, 5)) >= 5
        True
    """
    cuda = device.type == "cuda"
    t_end = time.perf_counter() + warmup_s
    n = 0
    while n < 3 or time.perf_counter() < t_end:
        fn()
        n += 1
    if cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - start
        done = len(times) >= min_iters and elapsed >= min_time_s
        if done or len(times) >= max_iters or (elapsed >= max_time_s and len(times) >= 3):
            return times


def _torch_fn(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    @torch.inference_mode()
    def fn() -> Any:
        return as_outputs(module(*inputs))

    return fn


def _channels_last(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs)


def _ort_fn(session: Any, inputs: tuple[torch.Tensor, ...], on_cuda: bool) -> Callable[[], Any]:
    """ONNX Runtime call with inputs already where the session reads them (IO binding on CUDA)."""
    from qatsparse.export.runners import ORT_NUMPY_DTYPES, as_ort_input

    specs = session.get_inputs()
    if on_cuda:
        binding = session.io_binding()
        keep = []
        for spec, t in zip(specs, inputs):
            np_dtype = ORT_NUMPY_DTYPES.get(spec.type, np.float32)
            t = t.to(dtype=torch.from_numpy(np.zeros(0, np_dtype)).dtype)
            t = t.contiguous()
            keep.append(t)
            binding.bind_input(spec.name, "cuda", t.device.index or 0, np_dtype, list(t.shape), t.data_ptr())
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")

        def fn() -> Any:
            session.run_with_iobinding(binding)
            return keep

        return fn
    feed = {s.name: as_ort_input(t, s.type) for s, t in zip(specs, inputs)}
    return lambda: session.run(None, feed)


def benchmark(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    batch_sizes: Sequence[int] = (1, 32, 256),
    backends: Sequence[str] = BACKENDS,
    onnx_path: str | Path | None = None,
    engine_path: str | Path | None = None,
    device: str | torch.device | None = None,
    qat_module: nn.Module | None = None,
    channels_last: bool | Literal["auto"] = "auto",
    cuda_graphs: bool = True,
    warmup_s: float = 0.2,
    min_time_s: float = 1.0,
    min_iters: int = 10,
    max_time_s: float = 10.0,
    ort_threads: int | None = None,
) -> dict[str, Any]:
    """Time ``module`` on every backend and batch size; returns a JSON-ready dict.

    Args:
        module: the FP32 model (a quantized model's fake quantizers are removed for the FP32/FP16 rows).
        example_inputs: one example batch (any batch size: rows are repeated to reach each batch size).
        batch_sizes: batch sizes to time.
        backends: any of :data:`BACKENDS`.
        onnx_path: ONNX file for ``onnxruntime`` (default: ``module`` exported to FP32 ONNX in a temp dir).
        engine_path: TensorRT engine for ``tensorrt`` (skipped with a reason when absent or not importable).
        device: ``"cuda"``/``"cpu"``; default CUDA where available.
        qat_module: the fake-quantized model for ``pytorch_qat`` (default: ``module`` when it has quantizers).
        channels_last: for 4-D inputs on CUDA; ``"auto"`` times both memory formats briefly and keeps the faster.
        cuda_graphs: replay TensorRT through a CUDA graph (as trtexec does).
        warmup_s, min_time_s, min_iters, max_time_s: timing budget per (backend, batch size).
        ort_threads: ONNX Runtime intra-op threads (default: its own choice).

    Returns:
        ``{"device", "versions", "settings", "results": [...], "skipped": [...], "notes": [...]}``; each result
        has ``backend``, ``batch_size``, ``precision``, ``latency_ms`` (median/p90/p99/mean/min/cv),
        ``throughput_per_s`` (samples per second at the median latency) and how it was run.

    Example:
        >>> r = benchmark(nn.Linear(8, 2), [torch.zeros(1, 8)], batch_sizes=(1,), backends=("pytorch_fp32",),
        ...               device="cpu", warmup_s=0, min_time_s=0, min_iters=3)
        >>> r["results"][0]["backend"], r["results"][0]["iterations"] >= 3
        ('pytorch_fp32', True)
    """
    from qatsparse.environment import device_info, library_versions
    from qatsparse.quantization import is_quantized, remove_quantizers

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; valid: {list(BACKENDS)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    cuda = dev.type == "cuda"
    example_inputs = tuple(t.detach().cpu() for t in example_inputs)
    timing = {"warmup_s": warmup_s, "min_time_s": min_time_s, "min_iters": min_iters, "max_time_s": max_time_s}
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    notes: list[str] = []
    if not cuda:
        notes.append(
            "CPU-only: no CUDA device, so PyTorch FP16 and TensorRT are not timed; the numbers are CPU latencies"
        )
    fp32 = copy.deepcopy(module).eval()
    if is_quantized(fp32):
        qat_module = qat_module or module
        fp32 = remove_quantizers(fp32)
    tmpdir = tempfile.TemporaryDirectory(prefix="qatsparse-bench-")
    try:
        for backend in backends:
            try:
                rows = _run_backend(
                    backend, fp32, qat_module, example_inputs, batch_sizes, dev, onnx_path, engine_path,
                    channels_last, cuda_graphs, timing, ort_threads, Path(tmpdir.name), skipped,
                )  # fmt: skip
            except Exception as e:  # one failing backend must not lose the others' numbers
                skipped.append({"backend": backend, "reason": f"failed: {type(e).__name__}: {e}"})
                continue
            results += rows
    finally:
        tmpdir.cleanup()
    return {
        "device": device_info(),
        "versions": library_versions(),
        "settings": {
            "device": str(dev),
            "batch_sizes": [int(b) for b in batch_sizes],
            "backends": list(backends),
            "input_shapes": [list(t.shape[1:]) for t in example_inputs],
            "channels_last": channels_last,
            "cuda_graphs": cuda_graphs,
            "timer": "CUDA events around each inference" if cuda else "time.perf_counter around each inference",
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "torch_threads": torch.get_num_threads(),
            **timing,
        },
        "cpu_only": not cuda,
        "results": results,
        "skipped": skipped,
        "notes": notes,
    }


def _run_backend(
    backend: str,
    fp32: nn.Module,
    qat_module: nn.Module | None,
    example: tuple[torch.Tensor, ...],
    batch_sizes: Sequence[int],
    dev: torch.device,
    onnx_path: str | Path | None,
    engine_path: str | Path | None,
    channels_last: bool | Literal["auto"],
    cuda_graphs: bool,
    timing: dict[str, Any],
    ort_threads: int | None,
    tmpdir: Path,
    skipped: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    cuda = dev.type == "cuda"
    rows: list[dict[str, Any]] = []

    def row(bs: int, precision: str, times: list[float], **how: Any) -> None:
        rows.append({"backend": backend, "batch_size": int(bs), "precision": precision, **_stats(times, bs), **how})

    if backend in ("pytorch_fp32", "pytorch_fp16", "pytorch_qat"):
        if backend == "pytorch_fp16" and not cuda:
            skipped.append({"backend": backend, "reason": "FP16 eager on the CPU is emulated, not a deployment path"})
            return rows
        if backend == "pytorch_qat" and qat_module is None:
            skipped.append({"backend": backend, "reason": "no fake-quantized model given (qat_module)"})
            return rows
        model = copy.deepcopy(qat_module if backend == "pytorch_qat" else fp32).to(dev).eval()
        half = backend == "pytorch_fp16"
        if half:
            model = model.half()
        for bs in batch_sizes:
            inputs = _batch(example, bs, dev)
            if half:
                inputs = tuple(t.half() if t.is_floating_point() else t for t in inputs)
            fmt = "contiguous"
            has_4d = any(t.dim() == 4 for t in inputs)
            if cuda and has_4d and channels_last is not False:
                cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
                cl_inputs = _channels_last(inputs)
                if channels_last == "auto":
                    quick = {**timing, "min_time_s": 0.2, "min_iters": 5, "max_time_s": 2.0}
                    t_c = np.median(time_callable(_torch_fn(model, inputs), dev, **quick))
                    t_cl = np.median(time_callable(_torch_fn(cl_model, cl_inputs), dev, **quick))
                    use_cl = t_cl < t_c
                else:
                    use_cl = True
                if use_cl:
                    model, inputs, fmt = cl_model, cl_inputs, "channels_last"
            times = time_callable(_torch_fn(model, inputs), dev, **timing)
            precision = {"pytorch_fp32": "fp32", "pytorch_fp16": "fp16", "pytorch_qat": "int8 fake-quant"}[backend]
            row(bs, precision, times, memory_format=fmt, engine="eager")
        return rows

    if backend == "onnxruntime":
        from qatsparse.export.onnx import export_onnx
        from qatsparse.export.runners import ort_session

        path = Path(onnx_path) if onnx_path else export_onnx(fp32, example, tmpdir / "model_fp32.onnx")
        session = ort_session(path, threads=ort_threads, cuda=cuda)
        on_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
        from qatsparse.pipeline import onnx_precision

        precision = onnx_precision(path)
        ort_dev = dev if on_cuda else torch.device("cpu")
        for bs in batch_sizes:
            inputs = _batch(example, bs, ort_dev)
            times = time_callable(_ort_fn(session, inputs, on_cuda), ort_dev, **timing)
            row(bs, precision, times, provider=session.get_providers()[0], onnx=str(path))
        if cuda and not on_cuda:
            skipped.append(
                {"backend": backend, "reason": "onnxruntime has no CUDAExecutionProvider here: timed on the CPU"}
            )
        return rows

    # tensorrt
    from qatsparse.export.tensorrt import TensorRTRunner, tensorrt_available

    if not tensorrt_available():
        skipped.append({"backend": backend, "reason": "TensorRT is not importable (or no CUDA device)"})
        return rows
    if engine_path is None or not Path(engine_path).exists():
        skipped.append({"backend": backend, "reason": f"no engine file given (engine_path={engine_path})"})
        return rows
    runner = TensorRTRunner(engine_path)
    for bs in batch_sizes:
        lo, hi = next(iter(runner.batch_range.values()))
        if not lo <= bs <= hi:
            skipped.append({"backend": backend, "batch_size": int(bs), "reason": f"outside the profile [{lo}, {hi}]"})
            continue
        fn, graphed = runner.timed_callable(_batch(example, bs, dev), cuda_graph=cuda_graphs)
        times = time_callable(fn, dev, **timing)
        row(bs, "engine", times, cuda_graph=graphed, engine=str(engine_path))
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The benchmark result as a plain-text table (what ``qatsparse bench`` prints).

    Example:
        >>> r = benchmark(nn.Linear(8, 2), [torch.zeros(1, 8)], batch_sizes=(1,), backends=("pytorch_fp32",),
        ...               device="cpu", warmup_s=0, min_time_s=0, min_iters=3)
        >>> "pytorch_fp32" in format_table(r)
        True
    """
    import io

    from rich.console import Console
    from rich.table import Table

    dev = result.get("device", {})
    where = dev.get("gpu") or f"CPU ({dev.get('cpu', '?')}, {dev.get('cpu_threads', '?')} threads)"
    table = Table(title=f"qatsparse bench on {where}")
    for col in ("backend", "batch", "precision", "median ms", "p90 ms", "p99 ms", "samples/s", "iters", "how"):
        table.add_column(col, justify="right" if col not in ("backend", "precision", "how") else "left")
    for r in result.get("results", []):
        lat = r["latency_ms"]
        how = ", ".join(str(r[k]) for k in ("memory_format", "provider") if k in r)
        if "cuda_graph" in r:
            how = "CUDA graph" if r["cuda_graph"] else "no CUDA graph"
        table.add_row(
            r["backend"],
            str(r["batch_size"]),
            r["precision"],
            f"{lat['median']:.3f}",
            f"{lat['p90']:.3f}",
            f"{lat['p99']:.3f}",
            f"{r['throughput_per_s']:.1f}",
            str(r["iterations"]),
            how,
        )
    buf = io.StringIO()
    console = Console(file=buf, width=140, color_system=None)
    console.print(table)
    for s in result.get("skipped", []):
        bs = f" (batch {s['batch_size']})" if "batch_size" in s else ""
        console.print(f"skipped {s['backend']}{bs}: {s['reason']}")
    for n in result.get("notes", []):
        console.print(f"note: {n}")
    return buf.getvalue()
