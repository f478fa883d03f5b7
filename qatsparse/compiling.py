"""The one switch for the compiled training path: ``compile=True`` on the QAT callback."""

from __future__ import annotations

from typing import Any

from torch import nn

#: What ``compile=True`` means: torch.compile's default mode and options. A QAT step has many small fused
#: kernels and Inductor's Python launcher can leave the GPU idle between them; its C++ launcher
#: (``TORCHINDUCTOR_CPP_WRAPPER=1`` in the environment) removes that gap -- measured in docs/BENCHMARKS.md.
#: It is not forced here: passed per call as ``options={"cpp_wrapper": True}`` it failed in torch 2.11
#: ("CudaKernelParamCache not populated"), while the environment variable worked.
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
    state_dict keys are unchanged, so callbacks, checkpoints and export keep working."""
    if setting is False:
        return
    module.compile(**compile_kwargs(setting))
