"""``TensorRTRunner``: a serialized engine run with ``execute_async_v3``, tensors bound by name (torch CUDA
buffers), inside the engine's optimization profile; a timed callable for benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from qatsparse.export.trt_loader import import_tensorrt, trt_logger


class TensorRTRunner:
    """Runs a serialized engine with ``execute_async_v3``, tensors bound by name, torch CUDA buffers.

    Any shape inside the engine's optimization profile works; inputs are matched to the engine's input
    tensors by position in the engine's I/O order (the ONNX input order) or by name through
    :meth:`run_named`.

    Example (needs TensorRT and a GPU):
        >>> runner = TensorRTRunner("export/model.plan")  # doctest: +SKIP
        >>> outputs = runner((torch.randn(8, 1, 8, 8),))  # doctest: +SKIP
    """

    device = "cuda"

    def __init__(self, plan_path: str | Path, name: str = "tensorrt", precision: str = "engine") -> None:
        trt = import_tensorrt()
        self.name, self.precision = name, precision
        self._trt = trt
        self.runtime = trt.Runtime(trt_logger())
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.input_names = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        self.profile = {n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, 0))
                        for n in self.input_names}  # fmt: skip
        self.batch_range = {n: (p[0][0], p[2][0]) for n, p in self.profile.items()}

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8}
        for trt_name, torch_dtype in (("bool", torch.bool), ("int64", torch.int64), ("bfloat16", torch.bfloat16)):
            if hasattr(trt, trt_name):
                table[getattr(trt, trt_name)] = torch_dtype
        return table[self.engine.get_tensor_dtype(name)]

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        lo, _, hi = self.profile[name]
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            what = f"batch {shape[0]}" if shape[1:] == tuple(lo[1:]) == tuple(hi[1:]) else f"shape {shape}"
            raise ValueError(f"{what} of {name!r} is outside the engine's profile [{lo}, {hi}]")

    def bind(self, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Set shapes and addresses for ``inputs`` (copied to CUDA on the current stream); returns (device
        inputs, fresh output buffers). The returned tensors must stay alive while the context runs."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"engine takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        dev_inputs = []
        for name, t in zip(self.input_names, inputs):
            self._check_shape(name, tuple(t.shape))
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

        The inputs are copied on the current stream; the first enqueue (which does the setup work after a
        shape change) runs on a side stream that waits for those copies, and is kept out of the graph. With
        ``cuda_graph`` the enqueue is then captured once into a CUDA graph and replayed (as trtexec does); if
        capture fails it falls back to plain enqueues. Returns the function and whether a graph is used.
        """
        self._bench_buffers = self.bind(inputs)
        current = torch.cuda.current_stream()
        stream = torch.cuda.Stream()
        stream.wait_stream(current)  # the input copies above were enqueued on `current`
        with torch.cuda.stream(stream):
            self.execute(stream)
        stream.synchronize()
        if cuda_graph:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    self.execute(torch.cuda.current_stream())
                current.wait_stream(stream)
                return graph.replay, True
            except Exception as e:  # pragma: no cover - depends on the engine
                print(f"[qatsparse] CUDA graph capture of the TensorRT engine failed ({e}); timing plain enqueues")
        current.wait_stream(stream)
        return (lambda: self.execute(torch.cuda.current_stream())), False

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        outs = self.run_device([t.to("cuda") for t in inputs])
        torch.cuda.current_stream().synchronize()
        return tuple(o.float().cpu() for o in outs)
