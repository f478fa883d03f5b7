"""Quantize a Linear whose weight its parent uses directly: ``F.linear(x, self.qkv.weight, ...)``.

torchvision's Swin attention (``ShiftedWindowAttention``) and many hand-written blocks pass a child
Linear's ``weight`` to a function instead of calling the child, so the child's quantized ``forward``
never runs: its input and weight would stay unquantized and its calibrator would see no data. A module
whose class source reads ``self.<child>.weight`` of a quantized Linear child and never calls
``self.<child>(...)`` gets a generated
class (same parameters, hooks and state) whose ``forward`` runs the original one inside a
``TorchFunctionMode`` that replaces each ``F.linear`` on such a weight by the same call with the child's
input and weight quantizers applied -- the Q/DQ TensorRT needs around that GEMM. Hand-written because
PyTorch offers no hook on functional uses of a parameter.

Limits: the weight must reach ``F.linear`` as the parameter itself (not a slice or a copy); a forward
whose source cannot be read is not searched (the calibration then names the child as not reached and
the QAT callback keeps it in higher precision).

Example:
    >>> from torchvision.models.swin_transformer import ShiftedWindowAttention
    >>> from qatsparse.quantization import QuantConfig, quantize_model
    >>> m = nn.Sequential(ShiftedWindowAttention(16, [4, 4], [2, 2], 2)); s = quantize_model(m, QuantConfig())
    >>> s.notes["0"]
    'forward uses the weight of qkv, proj directly: quantized at its F.linear call'
"""

from __future__ import annotations

import inspect
import re
import textwrap
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_LINEAR = {F.linear, torch._C._nn.linear}
#: Generated classes by original class.
_GENERATED: dict[type, type] = {}


class _QuantizeFunctionalLinear(TorchFunctionMode):
    """Apply a Linear child's quantizers when its weight reaches ``F.linear`` directly."""

    def __init__(self, layers: dict[int, nn.Module]) -> None:
        super().__init__()
        self.layers = layers

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _LINEAR:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self.layers.get(id(weight))
            if layer is not None:
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return F.linear(layer.input_quantizer(x), layer.weight_quantizer(weight), bias)
        return func(*args, **kwargs)


def _functional_children(module: nn.Module) -> list[str]:
    """Quantized Linear children whose ``.weight`` the module's class reads but which it never calls."""
    from qatsparse.quantization.layers import QuantLinear

    children = [n for n, c in module.named_children() if isinstance(c, QuantLinear)]
    if not children:
        return []
    try:
        src = textwrap.dedent(inspect.getsource(type(module)))
    except (OSError, TypeError):
        return []
    return [
        n
        for n in children
        if re.search(rf"self\.{re.escape(n)}\.weight\b", src) and not re.search(rf"self\.{re.escape(n)}\(", src)
    ]


def _wrapping_class(base: type) -> type:
    if base not in _GENERATED:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            layers = {id(getattr(self, n).weight): getattr(self, n) for n in self._qatsparse_functional}
            with _QuantizeFunctionalLinear(layers):
                return base.forward(self, *args, **kwargs)

        name = f"FunctionalQuant{base.__name__}_{len(_GENERATED)}"
        cls = type(name, (base,), {"forward": forward, "_qatsparse_functional_base": base, "__module__": __name__})
        cls.__qualname__ = name
        globals()[name] = cls  # so that pickle finds it (within this process)
        _GENERATED[base] = cls
    return _GENERATED[base]


def intercept_functional_linears(model: nn.Module) -> dict[str, str]:
    """Wrap every module whose forward uses a quantized Linear child's weight directly (see the module
    docstring); returns ``{module name: what}`` for the summary's notes. Idempotent."""
    notes: dict[str, str] = {}
    for name, m in model.named_modules():
        if hasattr(type(m), "_qatsparse_functional_base"):
            children = list(m._qatsparse_functional)
        else:
            children = _functional_children(m)
            if not children:
                continue
            m._qatsparse_functional = tuple(children)
            m.__class__ = _wrapping_class(type(m))
        notes[name] = f"forward uses the weight of {', '.join(children)} directly: quantized at its F.linear call"
    return notes


def remove_functional_interception(model: nn.Module) -> None:
    """Undo :func:`intercept_functional_linears` in place."""
    for m in model.modules():
        base = getattr(type(m), "_qatsparse_functional_base", None)
        if base is not None:
            m.__class__ = base
            m.__dict__.pop("_qatsparse_functional", None)
