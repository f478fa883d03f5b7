"""The one switch for the compiled training path: ``compile=True`` on the QAT callback."""

from __future__ import annotations

from functools import partial
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
        from torch._inductor import list_mode_options

        try:
            list_mode_options(setting)  # the modes torch.compile knows, checked before any training
        except RuntimeError as e:
            raise ValueError(f"compile={setting!r} is not a torch.compile mode: {e}") from None
        return {"mode": setting}
    raise ValueError(f"compile must be True or a torch.compile mode name, got {setting!r}")


#: AOTAutograd partitioner settings of ``recompute=True``. By default the partitioner never recomputes in
#: the backward a value the backward must materialize (a conv or GEMM input), so a compiled QAT step keeps
#: both a conv's fake-quantized input and the tensor it was computed from (for the ReLU before it and the
#: quantizer's mask): about 1.4x the activation memory of compiled AMP on ResNet-50
#: (benchmarks/results/saved_tensors_resnet50_h200_checkpoint.json). Lifting that ban lets it recompute the
#: fake-quantized input from the kept tensor with cheap pointwise ops instead.
RECOMPUTE_PARTITIONER: dict[str, Any] = {"ban_recompute_materialized_backward": False}


def recompute_backend(gm: Any, example_inputs: Any, options: dict[str, Any] | None = None) -> Any:
    """Inductor, with :data:`RECOMPUTE_PARTITIONER` applied to this compilation only (a ``torch.compile``
    backend: the partitioner runs inside the call, so a scoped config patch reaches it and no other
    compiled model in the process is affected). ``options``: Inductor settings, as ``torch.compile``'s
    ``options`` (a ``mode``'s are ``torch._inductor.list_mode_options(mode)``).

    Example:
        >>> fn = torch.compile(lambda x: x.relu() * 2, backend=recompute_backend)  # doctest: +SKIP
    """
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    with functorch_config.patch(**RECOMPUTE_PARTITIONER):
        return compile_fx(gm, example_inputs, config_patches=dict(options or {}))


def compile_module(module: nn.Module, setting: bool | str, recompute: bool = False) -> None:
    """Compile ``module``'s forward in place (``nn.Module.compile``): parameters, buffers and
    state_dict keys are unchanged, so callbacks, checkpoints and export keep working.

    ``recompute=True`` compiles with :func:`recompute_backend` (with the options of ``setting``'s mode, if
    one is named): less activation memory, some more pointwise work in the backward, the same numbers.

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
    kwargs = compile_kwargs(setting)
    if recompute:
        from torch._inductor import list_mode_options

        options = list_mode_options(kwargs["mode"]) if "mode" in kwargs else kwargs.get("options")
        module.compile(backend=partial(recompute_backend, options=options))
    else:
        module.compile(**kwargs)
