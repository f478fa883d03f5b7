"""The unit 2:4 sparsity prunes: one weight tensor of a module, and the axis its groups of 4 run along.

A :class:`PrunableWeight` is a (module, parameter, input axis) triple. Most are a layer's ``weight``
(``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``), but not all: ``nn.MultiheadAttention`` keeps its input
projection in ``in_proj_weight`` (or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when key and
value have their own sizes) and uses it without any ``nn.Linear``; transformers' ``Conv1D`` (GPT-2 and
its family) is a Linear whose weight is stored transposed, ``(in, out)``, so its input axis is 0.

Each weight has a **key**: the module's name when the parameter is called ``weight`` (so masks saved
before this abstraction existed, keyed by module name, still load), else ``"<module>.<parameter>"``
(e.g. ``"encoder.0.self_attn.in_proj_weight"``). :func:`resolve_weight` turns a key back into the
weight; :func:`prunable_weights` lists every candidate of a model (eligible or not: see
:mod:`~qatsparse.sparsity.eligibility`).

Example:
    >>> w = prunable_weights(nn.MultiheadAttention(16, 2))
    >>> sorted(w), w["in_proj_weight"].in_axis, tuple(w["in_proj_weight"].weight.shape)
    (['in_proj_weight', 'out_proj'], 1, (48, 16))
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: Module types that own prunable weights (subclasses included); transformers' ``Conv1D`` is recognised
#: by name so that transformers need not be installed.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.MultiheadAttention)


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (``transformers.pytorch_utils.Conv1D``, weight ``(in, out)``) and its
    subclasses."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in type(module).__mro__)


@dataclass(eq=False)
class PrunableWeight:
    """One weight that 2:4 sparsity can prune: where it lives and along which axis its groups run.

    Attributes:
        name: the key (module name for a parameter called ``weight``, else ``module.parameter``).
        module_name: the owning module's name in the model.
        module: the owning module.
        param: the parameter's attribute name on ``module``.
        in_axis: the input-channel (reduction) axis of the weight: groups of 4 run along it.
        out_axis: the output-channel axis.
        groups: the module's ``groups`` (convolutions), else 1.

    Example:
        >>> conv = nn.Conv2d(16, 8, 3); w = prunable_weights(conv)[""]
        >>> (w.param, w.in_axis, w.c_in, w.c_out, w.kind)
        ('weight', 1, 16, 8, 'Conv2d')
    """

    name: str
    module_name: str
    module: nn.Module
    param: str
    in_axis: int
    out_axis: int
    groups: int = 1

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.param)

    @property
    def c_in(self) -> int:
        return int(self.weight.shape[self.in_axis])

    @property
    def c_out(self) -> int:
        return int(self.weight.shape[self.out_axis])

    @property
    def kind(self) -> str:
        """The owning layer type, with the parameter unless it is ``weight`` (``MultiheadAttention.in_proj_weight``)."""
        base = type(self.module).__name__
        return base if self.param == "weight" else f"{base}.{self.param}"


def weight_key(module_name: str, param: str) -> str:
    """The key of parameter ``param`` of module ``module_name``.

    Example:
        >>> weight_key("layer1.conv", "weight"), weight_key("attn", "in_proj_weight")
        ('layer1.conv', 'attn.in_proj_weight')
    """
    if param == "weight":
        return module_name
    return f"{module_name}.{param}" if module_name else param


def _specs(module: nn.Module) -> list[tuple[str, int, int]]:
    """(parameter, in_axis, out_axis) of each prunable weight the module owns directly."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [("in_proj_weight", 1, 0)]
        separate = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [(p, 1, 0) for p in separate if getattr(module, p) is not None]
    if is_hf_conv1d(module):
        return [("weight", 0, 1)]
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(module, "weight", None) is not None:
        return [("weight", 1, 0)]
    return []


def prunable_weights(model: nn.Module) -> dict[str, PrunableWeight]:
    """Every candidate weight of ``model`` by key, in module order (eligible or not).

    Example:
        >>> list(prunable_weights(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 2))))
        ['0', '2']
    """
    out: dict[str, PrunableWeight] = {}
    for name, m in model.named_modules():
        for param, in_axis, out_axis in _specs(m):
            key = weight_key(name, param)
            out[key] = PrunableWeight(key, name, m, param, in_axis, out_axis, int(getattr(m, "groups", 1) or 1))
    return out


def resolve_weight(model: nn.Module, key: str) -> PrunableWeight | None:
    """The prunable weight of ``model`` with this key, or None.

    Example:
        >>> resolve_weight(nn.Sequential(nn.Linear(4, 4)), "0").param
        'weight'
    """
    return prunable_weights(model).get(key)
