"""The one switch for the compiled training path: ``compile=True`` on the QAT callback."""

from __future__ import annotations

from typing import Any

from torch import nn

#: What ``compile=True`` means: torch.compile's default mode with Inductor's C++ wrapper, which launches
#: the generated kernels from C++ instead of Python. A QAT step has many small fused kernels; measured
#: on an H200 (docs/BENCHMARKS.md) the Python launcher left the GPU idle between them.
DEFAULT_COMPILE_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}


def compile_kwargs(setting: bool | str) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for a ``compile`` setting: True -> the default options above,
    a string -> that ``mode`` (e.g. ``"reduce-overhead"``), False -> not compiled.

    Example:
        >>> compile_kwargs(True), compile_kwargs("max-autotune")
        ({'options': {'cpp_wrapper': True}}, {'mode': 'max-autotune'})
    """
    if setting is True:
        return {"options": dict(DEFAULT_COMPILE_OPTIONS)}
    if isinstance(setting, str):
        return {"mode": setting}
    raise ValueError(f"compile must be True or a torch.compile mode name, got {setting!r}")


def compile_module(module: nn.Module, setting: bool | str) -> None:
    """Compile ``module``'s forward in place (``nn.Module.compile``): parameters, buffers and
    state_dict keys are unchanged, so callbacks, checkpoints and export keep working."""
    if setting is False:
        return
    module.compile(**compile_kwargs(setting))
