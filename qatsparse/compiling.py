"""The one switch for the compiled training path: ``compile=True`` on the QAT callback."""

from __future__ import annotations

from typing import Any

from torch import nn

#: Per-call torch.compile options of ``compile=True``: none (the default mode). See :func:`compile_module`
#: for the C++ kernel launcher it turns on for CUDA modules.
DEFAULT_COMPILE_OPTIONS: dict[str, Any] = {}


def compile_kwargs(setting: bool | str) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for a ``compile`` setting: True -> the default options above,
    a string -> that ``mode`` (e.g. ``"reduce-overhead"``), False -> not compiled.

    Example:
        >>> compile_kwargs(True), compile_kwargs("max-autotune")
        ({}, {'mode': 'max-autotune'})
    """
    if setting is True:
        return {"options": dict(DEFAULT_COMPILE_OPTIONS)} if DEFAULT_COMPILE_OPTIONS else {}
    if isinstance(setting, str):
        return {"mode": setting}
    raise ValueError(f"compile must be True or a torch.compile mode name, got {setting!r}")


def compile_module(module: nn.Module, setting: bool | str) -> None:
    """Compile ``module``'s forward in place (``nn.Module.compile``): parameters, buffers and
    state_dict keys are unchanged, so callbacks, checkpoints and export keep working.

    With ``setting=True`` and the module on a CUDA device this also switches on Inductor's C++ kernel
    launcher for the process (``torch._inductor.config.cpp_wrapper``, the same switch as the environment
    variable ``TORCHINDUCTOR_CPP_WRAPPER=1``). A QAT step has many small fused kernels and Inductor's
    Python launcher left the GPU idle between them (docs/BENCHMARKS.md). It is set globally because
    passing ``options={"cpp_wrapper": True}`` per call failed in torch 2.11 ("CudaKernelParamCache not
    populated") while the global switch worked.
    """
    if setting is False:
        return
    if setting is True and any(p.is_cuda for p in module.parameters()):
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
    module.compile(**compile_kwargs(setting))
