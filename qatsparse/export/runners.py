"""Backends that run a model on a batch of inputs: PyTorch, ONNX Runtime (TensorRT: tensorrt.py).

Every runner is called with CPU tensors -- a tuple (positional inputs) or a dict (keyword inputs,
see :mod:`qatsparse.batches`) -- and returns a tuple of CPU float32 tensors, so validation and
benchmarking treat all backends alike. :func:`run` feeds keyword inputs by name to runners that take
them positionally (in their ``input_names`` order).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from qatsparse.batches import Inputs, as_outputs, call_model, inputs_to


class Runner(Protocol):
    """A backend: ``runner(inputs) -> outputs`` on CPU tensors; ``name`` and ``precision`` label it."""

    name: str
    precision: str

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]: ...


def run(runner: Any, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """Call ``runner`` on ``inputs``; keyword inputs go by name to a runner that takes positional ones.

    Example:
        >>> run(TorchRunner(nn.Identity(), "id"), {"input": torch.ones(1)})[0].tolist()
        [1.0]
    """
    if isinstance(inputs, Mapping) and not getattr(runner, "takes_keywords", False):
        names = list(runner.input_names)
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"{runner.name} takes inputs {names}; the keyword inputs {list(inputs)} lack {missing}")
        inputs = tuple(inputs[n] for n in names)
    return runner(inputs)


class TorchRunner:
    """Runs an ``nn.Module`` in eval mode under ``torch.no_grad`` on ``device`` (positional or keyword inputs),
    with PyTorch's attention fast paths off (every quantized layer runs, as in training and in the export).

    Example:
        >>> r = TorchRunner(nn.Linear(3, 2), "pytorch_fp32"); r((torch.zeros(4, 3),))[0].shape
        torch.Size([4, 2])
    """

    def __init__(
        self, module: nn.Module, name: str, precision: str = "fp32", device: str | torch.device = "cpu"
    ) -> None:
        self.module = module.to(device).eval()
        self.name, self.precision, self.device = name, precision, torch.device(device)

    takes_keywords = True

    @torch.no_grad()
    def __call__(self, inputs: Inputs) -> tuple[torch.Tensor, ...]:
        from qatsparse.attention import fast_paths_off

        with fast_paths_off():
            out = call_model(self.module, inputs_to(inputs, self.device))
        return tuple(o.detach().float().cpu() for o in as_outputs(out))


#: ONNX Runtime's input type names -> the numpy dtype to feed.
ORT_NUMPY_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
}


def as_ort_input(t: torch.Tensor, ort_type: str) -> np.ndarray:
    """``t`` as the numpy array an ONNX Runtime input of type ``ort_type`` takes (float32 when unknown).

    Example:
        >>> as_ort_input(torch.ones(2, dtype=torch.float64), "tensor(float16)").dtype
        dtype('float16')
    """
    return t.detach().cpu().numpy().astype(ORT_NUMPY_DTYPES.get(ort_type, np.float32), copy=False)


#: ONNX Runtime graph-optimization levels by the names qatsparse takes ("all" is ONNX Runtime's default)
ORT_LEVELS = ("all", "extended", "basic", "disabled")


def ort_session(
    path: str | Path,
    providers: list[str] | None = None,
    threads: int | None = None,
    cuda: bool = True,
    optimization: str = "all",
    save_optimized: str | Path | None = None,
) -> Any:
    """The one place qatsparse opens an ONNX Runtime session on a graph.

    Args:
        path: the ONNX file.
        providers: execution providers in order; default CUDA first where installed (and ``cuda``), then CPU.
        threads: intra-op threads (default: ONNX Runtime's choice).
        cuda: consider the CUDA provider for the default providers.
        optimization: graph-optimization level, one of :data:`ORT_LEVELS` (see :mod:`qatsparse.export.ort_level`).
        save_optimized: write the graph as ONNX Runtime optimized it to this path.

    Example:
        >>> from qatsparse.export.onnx import export_onnx
        >>> import tempfile; p = export_onnx(nn.Linear(3, 2), [torch.zeros(1, 3)], tempfile.mkdtemp() + "/m.onnx")
        >>> ort_session(p, cuda=False).get_providers()
        ['CPUExecutionProvider']
    """
    import onnxruntime as ort

    levels = dict(zip(ORT_LEVELS, (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    )))  # fmt: skip
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {list(ORT_LEVELS)}, got {optimization!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    if save_optimized is not None:  # the graph as ONNX Runtime rewrote it (see qatsparse.export.ort_level)
        opts.optimized_model_filepath = str(save_optimized)
        opts.log_severity_level = 3  # its warning that the file is hardware-specific: known, not for users
    if threads:
        opts.intra_op_num_threads = threads
    if providers is None:
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if cuda else ("CPUExecutionProvider",)
        providers = [p for p in wanted if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OnnxRuntimeRunner:
    """Runs an ONNX file with ONNX Runtime (CUDA provider first where available, else CPU).

    Inputs are fed by position in the graph's input order, or by name (a dict), and cast to each input's
    declared type. ``optimization`` is the graph-optimization level (``"all"``, ONNX Runtime's default,
    ``"extended"``, ``"basic"`` or ``"disabled"``; see :mod:`qatsparse.export.ort_level`); ``save_optimized``
    writes the graph as ONNX Runtime optimized it.

    Example:
        >>> from qatsparse.export.onnx import export_onnx
        >>> import tempfile; p = export_onnx(nn.Linear(3, 2), [torch.zeros(1, 3)], tempfile.mkdtemp() + "/m.onnx")
        >>> OnnxRuntimeRunner(p)((torch.zeros(5, 3),))[0].shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        path: str | Path,
        name: str = "onnxruntime",
        precision: str = "onnx",
        providers: list[str] | None = None,
        threads: int | None = None,
        optimization: str = "all",
        save_optimized: str | Path | None = None,
    ) -> None:
        self.path, self.name, self.precision = Path(path), name, precision
        self.optimization = optimization
        self.session = ort_session(
            self.path, providers, threads, optimization=optimization, save_optimized=save_optimized
        )
        self.inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self.inputs]
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    takes_keywords = True

    def __call__(self, inputs: Inputs) -> tuple[torch.Tensor, ...]:
        if isinstance(inputs, Mapping):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise ValueError(f"{self.path.name} takes inputs {self.input_names}; {list(inputs)} lack {missing}")
            inputs = tuple(inputs[n] for n in self.input_names)
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.path.name} takes {len(self.inputs)} inputs, got {len(inputs)}")
        feed = {spec.name: as_ort_input(t, spec.type) for spec, t in zip(self.inputs, inputs)}
        return tuple(torch.from_numpy(np.asarray(o)).float() for o in self.session.run(None, feed))
