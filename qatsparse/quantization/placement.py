"""Residual quantizers: a Q/DQ on the identity input of ``a + b`` after a quantized conv.

TensorRT fuses ``Add`` into the epilogue of the conv that produces one operand only when the other
operand (the residual) is INT8 too, i.e. comes through a Q/DQ pair. Conv inputs get their quantizers
from the class swap in :mod:`~qatsparse.quantization.modules`; an ``a + b`` is written in some
module's ``forward`` and cannot be reached by swapping layers. This module finds those adds without
the user rewriting the model:

1. Each non-container module's own ``forward`` is traced with ``torch.fx`` (its children are leaves,
   so only that forward is read). Tracing happens twice (train and eval mode); a forward whose graph
   depends on the mode, or that cannot be traced (data-dependent control flow, ...), is left alone
   and named in the quantization summary's ``notes``.
2. An ``add`` of two tensors qualifies when one operand comes from a quantized Conv/Linear, looking
   through BatchNorm/Identity (which TensorRT folds) and through ``nn.Sequential`` children that end in
   one (e.g. ``downsample``). The *other* operand is the residual; when both come from convs, the
   residual is the one fewer ops away from the forward's inputs (the shortcut).
3. A :class:`TensorQuantizer` is added as child ``residual_quantizer`` (``_1``, ``_2``, ... for more
   adds) and the module's class is changed in place to a generated subclass whose ``forward`` is the
   traced code with the quantizer applied to the residual. Parameters, hooks and other attributes
   are untouched; ``isinstance`` checks still hold; :func:`remove_residual_quantizers` swaps back.

Limits: adds written in a ``LightningModule``'s own ``forward``, in untraceable forwards or in forwards
that use an argument defaulting to ``None`` (its use depends on the call, which tracing cannot see) are not
found (wrap them in a submodule, or exclude nothing and accept the unfused add); a Python-level flag
read in ``forward`` other than ``self.training`` is frozen at its value when tracing; the generated
classes exist per process, so pickle the ``state_dict``, not the module object.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from qatsparse.quantization.layers import is_quant_layer
from qatsparse.quantization.quantizer import TensorQuantizer

#: Modules that TensorRT folds into the preceding conv (transparent when looking for the conv).
TRANSPARENT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Identity)
_ADDS = {operator.add, operator.iadd, torch.add}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: Generated classes by (base class, forward source), shared by identical blocks.
_GENERATED: dict[tuple[type, str], type] = {}


class _LeafTracer(fx.Tracer):
    """Trace only the root's own forward: every child module is one call."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._root


def _trace(module: nn.Module) -> fx.Graph:
    was = module.training
    try:
        graphs = []
        for mode in (True, False):
            module.train(mode)
            graphs.append(_LeafTracer(module).trace(module))
    finally:
        module.train(was)
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise RuntimeError("forward depends on self.training")
    # torch.fx traces an argument that defaults to None as a tensor, so `if shortcut is None: shortcut = x`
    # (timm DLA, transformers embeddings) would be traced as always given: a call without it would break.
    optional = [str(n.target) for n in graphs[1].nodes if n.op == "placeholder" and n.args == (None,) and n.users]
    if optional:
        raise RuntimeError(f"forward uses optional argument(s) {optional} that may be None")
    return graphs[1]


def _ends_in_quant_layer(module: nn.Module) -> bool:
    if is_quant_layer(module):
        return not isinstance(module, nn.MultiheadAttention)  # a Conv/Linear output, not an attention tuple
    if isinstance(module, nn.Sequential):
        for child in reversed(list(module)):
            if not isinstance(child, TRANSPARENT):
                return _ends_in_quant_layer(child)
    return False


def _from_quant_layer(node: object, root: nn.Module) -> bool:
    while isinstance(node, fx.Node) and node.op == "call_module":
        sub = root.get_submodule(str(node.target))
        if _ends_in_quant_layer(sub):
            return True
        if not isinstance(sub, TRANSPARENT) or not node.args:
            return False
        node = node.args[0]
    return False


def _depth(graph: fx.Graph) -> dict[fx.Node, int]:
    depth: dict[fx.Node, int] = {}
    for n in graph.nodes:
        ins = [a for a in n.all_input_nodes]
        depth[n] = 0 if not ins else 1 + max(depth[a] for a in ins)
    return depth


def _residual_adds(graph: fx.Graph, root: nn.Module) -> list[tuple[fx.Node, int]]:
    """(add node, index of its residual argument) for each qualifying add."""
    depth = _depth(graph)
    out = []
    for n in graph.nodes:
        is_add = (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target == "add")
        if not is_add or len(n.args) < 2 or n.kwargs.get("alpha", 1) != 1:
            continue
        a, b = n.args[0], n.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        fa, fb = _from_quant_layer(a, root), _from_quant_layer(b, root)
        if not (fa or fb):
            continue
        if fa and fb:
            out.append((n, 0 if depth[a] < depth[b] else 1))
        else:
            out.append((n, 1 if fa else 0))
    return out


def _generated_class(base: type, graph: fx.Graph) -> type:
    code = graph.python_code("self")
    key = (base, code.src)
    if key not in _GENERATED:
        name = f"Residual{base.__name__}_{len(_GENERATED)}"
        namespace = dict(code.globals)
        exec(compile(code.src, f"<qatsparse {name}.forward>", "exec"), namespace)
        cls = type(name, (base,), {"forward": namespace["forward"], "_qatsparse_base": base, "__module__": __name__})
        cls.__qualname__ = name
        globals()[name] = cls  # so that pickle finds it (within this process)
        _GENERATED[key] = cls
    return _GENERATED[key]


def insert_residual_quantizers(
    model: nn.Module, make_quantizer: Callable[[], TensorQuantizer]
) -> tuple[dict[str, str], dict[str, str]]:
    """Add a quantizer on the residual input of every qualifying ``a + b`` (see the module docstring).

    Run after the Conv/Linear class swap (qualifying adds follow a *quantized* layer). Idempotent:
    modules that already have residual quantizers are reported, not traced again.

    Returns:
        ``(placed, notes)``: quantizer name -> what it quantizes; module name -> why its forward
        was not rewritten (only modules with a quantized direct child are named).

    Example:
        >>> from torchvision.models.resnet import BasicBlock
        >>> from qatsparse.quantization import QuantConfig, quantize_model
        >>> m = nn.Sequential(BasicBlock(8, 8)); s = quantize_model(m, QuantConfig()); list(s.residual)
        ['0.residual_quantizer']
    """
    placed: dict[str, str] = {}
    notes: dict[str, str] = {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for name, m in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if hasattr(type(m), "_qatsparse_base"):
            for qn, _ in m.named_children():
                if qn.startswith("residual_quantizer"):
                    placed[prefix + qn] = f"residual input of an add in {name or 'the model'}"
            continue
        if isinstance(m, (*_CONTAINERS, TensorQuantizer)) or is_quant_layer(m) or not any(True for _ in m.children()):
            continue
        if _is_lightning_module(m):
            continue
        has_quant_child = any(is_quant_layer(c) for c in m.children())
        try:
            graph = _trace(m)
        except Exception as e:  # any failure of tracing leaves the module as it is
            if has_quant_child:
                notes[name] = f"residual adds not searched: torch.fx could not trace forward ({str(e).splitlines()[0]})"
            continue
        adds = _residual_adds(graph, m)
        if not adds:
            continue
        for k, (node, idx) in enumerate(adds):
            qname = "residual_quantizer" if k == 0 else f"residual_quantizer_{k}"
            residual = node.args[idx]
            with graph.inserting_before(node):
                qnode = graph.call_module(qname, (residual,))
            args = list(node.args)
            args[idx] = qnode
            node.args = tuple(args)
            m.add_module(qname, make_quantizer().to(device))
            placed[prefix + qname] = f"residual input ({residual.name}) of {node.name} in {name or 'the model'}"
        graph.lint()
        m.__class__ = _generated_class(type(m), graph)
    return placed, notes


def _is_lightning_module(m: nn.Module) -> bool:
    return any(c.__name__ == "LightningModule" for c in type(m).__mro__)


def remove_residual_quantizers(model: nn.Module) -> None:
    """Undo :func:`insert_residual_quantizers` in place (original classes, quantizers deleted)."""
    for m in list(model.modules()):
        base = getattr(type(m), "_qatsparse_base", None)
        if base is None:
            continue
        for qn in [n for n, _ in m.named_children() if n.startswith("residual_quantizer")]:
            delattr(m, qn)
        m.__class__ = base
