"""Which quantized twin a layer gets (the layer classes are in :mod:`qatsparse.quantization.layers`).

| layer | twin | weight scales along |
| --- | --- | --- |
| ``nn.Conv2d``, ``nn.Conv1d`` | :class:`~qatsparse.quantization.layers.QuantConv2d`, ``QuantConv1d`` | axis 0 |
| ``nn.ConvTranspose2d`` (groups=1) | :class:`~qatsparse.quantization.layers.QuantConvTranspose2d` | axis 1 |
| ``nn.Linear`` | :class:`~qatsparse.quantization.layers.QuantLinear` | axis 0 |
| transformers ``Conv1D`` (GPT-2) | ``QuantHFConv1D`` + the transformers class | axis 1 |
| ``nn.MultiheadAttention`` | :class:`~qatsparse.quantization.attention.QuantMultiheadAttention` | axis 0 |

A subclass of one of these that keeps the base class's ``forward`` (e.g. the ``out_proj`` of
``nn.MultiheadAttention``, a ``NonDynamicallyQuantizableLinear``) gets a generated twin that is both
the user's class and the quantized one; a subclass with its own ``forward`` is left alone and named
(its forward may do anything: swapping it would silently drop that code).

Example:
    >>> quant_class_for(nn.Linear(4, 4))[0].__name__, quant_class_for(nn.ReLU())
    ('QuantLinear', (None, None))
"""

from __future__ import annotations

from torch import nn

from qatsparse.quantization.attention import QuantMultiheadAttention
from qatsparse.quantization.layers import (
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantHFConv1D,
    QuantLayer,
    QuantLinear,
)

#: float class -> its quantized twin (exact classes; subclasses get generated twins).
EXACT_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: QuantConv2d,
    nn.Conv1d: QuantConv1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
    nn.MultiheadAttention: QuantMultiheadAttention,
}


#: Generated twins of subclasses (and of transformers' Conv1D), by float class.
_GENERATED: dict[type[nn.Module], type[nn.Module]] = {}


def _generated_twin(twin: type, base: type[nn.Module]) -> type[nn.Module]:
    """A class that is both ``base`` (the user's layer class) and ``twin`` (its quantized forward)."""
    if base not in _GENERATED:
        name = f"Quant_{base.__module__.replace('.', '_')}_{base.__qualname__.replace('.', '_')}"
        cls = type(name, (twin, base), {"_qatsparse_float": base, "__module__": __name__})
        cls.__qualname__ = name
        globals()[name] = cls  # so that pickle finds it (within this process)
        _GENERATED[base] = cls
    return _GENERATED[base]


def _overrides_forward(cls: type, base: type) -> bool:
    return any(
        getattr(cls, attr, None) is not getattr(base, attr, None)
        for attr in ("forward", "_conv_forward")
        if hasattr(base, attr)
    )


def quant_class_for(module: nn.Module) -> tuple[type[nn.Module] | None, str | None]:
    """``(twin class, None)`` for a layer that can be quantized, ``(None, reason)`` for one of a quantizable
    type that cannot, ``(None, None)`` for anything else (and for twins already).
    """
    from qatsparse.sparsity.weights import is_hf_conv1d

    t = type(module)
    if isinstance(module, QuantLayer):
        return None, None
    if is_hf_conv1d(module):
        hf_base = next(c for c in t.__mro__ if c.__name__ == "Conv1D" and c.__module__.startswith("transformers."))
        if _overrides_forward(t, hf_base):
            return None, f"subclass {t.__name__} of transformers Conv1D with its own forward (kept as it is)"
        return _generated_twin(QuantHFConv1D, t), None
    for base, twin in EXACT_TWINS.items():
        if not isinstance(module, base):
            continue
        if t is not base and _overrides_forward(t, base):
            return None, f"subclass {t.__name__} of {base.__name__} with its own forward (kept as it is)"
        reason = twin.unsupported(module)  # type: ignore[attr-defined]
        if reason is not None:
            return None, reason
        return (twin if t is base else _generated_twin(twin, t)), None
    return None, None
