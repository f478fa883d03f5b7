"""Which channels of a model can be reordered without changing what it computes (torch.fx).

A *channel group* is a set of activation channels that must be permuted together, with every tensor
slice that has to move with them: the output channels (weight axis 0, bias) of the layers that
produce them, the input channels (weight axis 1) of the layers that read them, and everything
per-channel in between (BatchNorm weight/bias/running statistics, LayerNorm affine parameters,
depthwise convs, per-channel scales such as ConvNeXt's ``layer_scale``). Residual additions and other
elementwise ops merge the groups of their operands; a concatenation along the channels lays the
groups of its inputs side by side; a depthwise conv passes its input's group through.

The model is traced with ``torch.fx`` (Conv1d/Conv2d/Linear and ``torch.nn`` layers are leaves) and shapes
are propagated on an example input, so flatten/reshape/permute/broadcasting are followed exactly.
A group is *blocked* -- left unpermuted, with the reason -- when any of its channels reaches
something the analysis does not understand: the model's inputs or outputs, an unknown op or module
(attention, RNNs, embeddings, user subclasses with their own ``forward``), grouped convs, a reshape
that mixes channels with other dimensions, a normalisation across channels. When the whole model
cannot be traced, its children are traced one by one (their boundaries are then blocked).

Hand-written rather than apex's ``permutation_lib``: that code works on its own parse of the fx
graph for a fixed list of module types and needs apex's CUDA extension; this one tracks each
tensor's channel axis through the ops, so unknown ops block exactly the groups they touch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from qatsparse.sparsity.permutation.analysis import ChannelAnalysis
from qatsparse.sparsity.permutation.channel_ops import LAYERS
from qatsparse.sparsity.permutation.plan import ChannelGroup, PermutationPlan, Reader, Slot
from qatsparse.sparsity.weights import is_hf_conv1d, prunable_weights

__all__ = ["ChannelGroup", "PermutationPlan", "Reader", "Slot", "find_channel_groups"]


# ---------------------------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    """torch.nn layers are leaves (fx's default) and so is every Conv1d/Conv2d/Linear, subclasses included."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LAYERS) or super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


@contextlib.contextmanager
def _eval_no_side_effects(model: nn.Module, device: torch.device | None) -> Iterator[None]:
    """Eval mode (BatchNorm statistics untouched), no gradients, RNG streams as they were."""
    modes = {m: m.training for m in model.modules()}
    devices = [device] if device is not None and device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def find_channel_groups(
    model: nn.Module, example_inputs: Sequence[Any], pruned: Sequence[str], example_kwargs: dict | None = None
) -> PermutationPlan:
    """Trace ``model`` and return its channel groups and the pruned layers that cannot be permuted.

    Args:
        model: the model (not changed; it runs once in eval mode on ``example_inputs``).
        example_inputs: positional inputs of ``model.forward`` (a batch of 1-2 samples is enough).
        pruned: keys of the weights that will be pruned 2:4 (:mod:`qatsparse.sparsity.weights`; the
            module name for a Conv1d/Conv2d/Linear). The search works for them; every other layer is
            permuted only as far as function preservation needs. Weights of other kinds (attention's
            packed projections, transformers' ``Conv1D``) are listed in ``not_permuted``.
        example_kwargs: keyword inputs of ``model.forward``.

    Every name in ``pruned`` ends either in a permutable group's readers or in ``not_permuted``.
    """
    params = _canonical_names(model)
    modules = dict(model.named_modules())
    plan = PermutationPlan()
    weights = prunable_weights(model)
    for key in pruned:  # weights the analysis cannot follow (attention's packed projection, Conv1D, ...)
        w = weights.get(key)
        if w is not None and (w.param != "weight" or not isinstance(w.module, LAYERS) or is_hf_conv1d(w.module)):
            plan.not_permuted[key] = f"{w.kind}: only Conv1d/Conv2d/Linear layers are permuted"
    pruned = [k for k in pruned if k not in plan.not_permuted]
    device = next((p.device for p in model.parameters()), None)
    regions, plan.notes = _traceable_regions(model)
    with _eval_no_side_effects(model, device):
        inputs = _region_inputs(model, [r for r, _ in regions if r], example_inputs, example_kwargs or {})
        for name, gm in regions:
            if name and name not in inputs:
                plan.notes[name] = "not called by forward on the example input"
                continue
            args, kwargs = (tuple(example_inputs), example_kwargs or {}) if not name else inputs[name]
            try:
                ShapeProp(gm).propagate(*_bind(gm, modules[name], args, kwargs))
            except Exception as e:  # the traced graph must run like the module; if not, leave it alone
                plan.notes[name or "<model>"] = f"traced graph did not run on the example input: {_short(e)}"
                continue
            ChannelAnalysis(gm, name, modules, params, set(pruned)).run(plan)
    seen = {r.layer for g in plan.groups for r in g.readers}
    for layer in pruned:
        if layer not in seen and layer not in plan.not_permuted:
            plan.not_permuted[layer] = _untraced_reason(layer, plan)
    for g in plan.groups:
        if g.blocked is not None:
            for r in g.readers:
                plan.not_permuted.setdefault(r.layer, g.blocked)
    # A layer reading several groups (a concatenation) is permuted if any of them is.
    for layer in plan.permuted_layers:
        plan.not_permuted.pop(layer, None)
    return plan


def _untraced_reason(layer: str, plan: PermutationPlan) -> str:
    inside = [n for n in plan.opaque_modules if layer.startswith(n + ".")]
    if inside:
        owner = max(inside, key=len)
        return f"inside {plan.opaque_modules[owner]} {owner!r}, which uses its weights without calling the layer"
    owners = [n for n in plan.notes if n == "<model>" or layer == n or layer.startswith(n + ".")]
    if owners:
        owner = max(owners, key=len)
        return f"in {owner!r}, which could not be analysed: {plan.notes[owner]}"
    return "not reached by the traced forward"


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:160]}"


def _traceable_regions(model: nn.Module) -> tuple[list[tuple[str, fx.GraphModule]], dict[str, str]]:
    """The model traced whole, or else its largest traceable sub-modules (with why the rest failed)."""
    regions: list[tuple[str, fx.GraphModule]] = []
    notes: dict[str, str] = {}

    def visit(name: str, module: nn.Module) -> None:
        if isinstance(module, LAYERS) or not any(True for _ in module.parameters()):
            return  # a lone layer has nothing to permute inside
        try:
            regions.append((name, _trace(module)))
            return
        except Exception as e:
            notes[name or "<model>"] = f"torch.fx cannot trace {type(module).__name__}: {_short(e)}"
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", model)
    return regions, notes


def _region_inputs(
    model: nn.Module, names: list[str], args: Sequence[Any], kwargs: dict
) -> dict[str, tuple[tuple, dict]]:
    """The first call's inputs of each named sub-module, recorded during one forward of ``model``."""
    if not names:
        return {}
    modules = dict(model.named_modules())
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, a: tuple, kw: dict, name: str = name) -> None:
            seen.setdefault(name, (a, kw))

        handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(*args, **kwargs)
    except Exception:  # what was seen before the failure is still usable
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def _bind(gm: fx.GraphModule, module: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """Positional values for the graph's placeholders, from a call's args and kwargs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not kwargs and len(args) == len(placeholders):
        return list(args)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return [bound.arguments[p.target] for p in placeholders]


def _canonical_names(model: nn.Module) -> dict[int, str]:
    """id(tensor) -> the first qualified name of each parameter and buffer (shared tensors: one name)."""
    out: dict[int, str] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(t), name)
    for name, t in model.named_buffers(remove_duplicate=False):
        out.setdefault(id(t), name)
    return out
