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

import builtins
import contextlib
import inspect
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from qatsparse.sparsity.weights import is_hf_conv1d, prunable_weights


@dataclass(frozen=True)
class Slot:
    """A slice of a parameter or buffer that moves with a channel group.

    Attributes:
        tensor: qualified name of the parameter or buffer in the model.
        axis: the axis of the tensor that runs over the group's channels.
        offset: where the group's channels start along that axis (non-zero after a concatenation).

    Example:
        >>> Slot("conv.weight", 1).offset
        0
    """

    tensor: str
    axis: int
    offset: int = 0


@dataclass(frozen=True)
class Reader:
    """A pruned layer that reads a channel group: its weight's input axis, from ``offset`` on."""

    layer: str
    weight: str
    offset: int = 0


@dataclass
class ChannelGroup:
    """Channels that are permuted together, what moves with them and whether they can move.

    Attributes:
        size: number of channels.
        slots: every tensor slice reordered by a permutation of the group.
        readers: the pruned layers whose input channels are these (the search maximises what their
            2:4 masks keep).
        producers: modules (or ops) whose outputs are these channels, for people reading the plan.
        blocked: why the group is left unpermuted, or None.

    Example:
        >>> ChannelGroup(size=16).blocked is None
        True
    """

    size: int
    slots: list[Slot] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    blocked: str | None = None

    @property
    def permutable(self) -> bool:
        return self.blocked is None and bool(self.readers)


@dataclass
class PermutationPlan:
    """Channel groups of a model and, for each pruned layer, whether its input channels can be permuted.

    Example:
        >>> m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        >>> plan = find_channel_groups(m, (torch.zeros(2, 16),), ["0", "2"])
        >>> plan.not_permuted["0"], [g.size for g in plan.groups if g.permutable]
        ('its input channels are the model input', [32])
    """

    groups: list[ChannelGroup] = field(default_factory=list)
    #: pruned layer -> why its input channels stay in place
    not_permuted: dict[str, str] = field(default_factory=dict)
    #: model parts analysed separately because the whole model could not be traced: name -> reason
    notes: dict[str, str] = field(default_factory=dict)
    #: modules called as one op that the analysis does not see into (attention, RNNs, ...): name -> type
    opaque_modules: dict[str, str] = field(default_factory=dict)

    @property
    def permuted_layers(self) -> list[str]:
        return sorted({r.layer for g in self.groups if g.permutable for r in g.readers})


# ---------------------------------------------------------------------------------------------- tracing
#: Layers the analysis follows (their exact forward; subclasses with their own are opaque).
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_STANDARD_FORWARD = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Linear.forward}


class _Tracer(fx.Tracer):
    """torch.nn layers are leaves (fx's default) and so is every Conv1d/Conv2d/Linear, subclasses included."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LAYERS) or super().is_leaf_module(m, module_qualified_name)


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
        if w is not None and (w.param != "weight" or not isinstance(w.module, _LAYERS) or is_hf_conv1d(w.module)):
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
            _Analysis(gm, name, modules, params, set(pruned)).run(plan)
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
        if isinstance(module, _LAYERS) or not any(True for _ in module.parameters()):
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


# ------------------------------------------------------------------------------------------- the analysis
@dataclass
class _Info:
    """What the analysis knows of a node's output: the channel axis and the groups laid along it."""

    shape: tuple[int, ...] | None = None
    axis: int | None = None  # None: layout unknown
    segs: list[tuple[int, int]] | None = None  # (group id, length) along the channel axis
    why: str = ""  # for an unknown layout: where the tensor comes from
    param: str | None = None  # get_attr of a parameter/buffer: its canonical name

    @property
    def tracked(self) -> bool:
        return self.axis is not None and self.segs is not None


_UNARY_FUNCS = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu,
    F.selu, F.celu, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, torch.relu, torch.sigmoid,
    torch.tanh, torch.exp, torch.abs, torch.neg, torch.square, torch.sqrt, torch.clamp, torch.clip,
    torch.dropout, torch.nn.functional.sigmoid, torch.nn.functional.tanh, operator.neg, torch.erf,
}  # fmt: skip
_UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "square", "sqrt", "clamp",
    "clamp_", "clip", "clamp_min", "clamp_min_", "clamp_max", "contiguous", "clone", "detach", "float",
    "half", "bfloat16", "erf", "pow",
}  # fmt: skip
_BINARY_FUNCS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_POOL_FUNCS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.max_pool1d, F.max_pool2d, F.interpolate, torch.nn.functional.upsample,
}  # fmt: skip
_SHAPE_ONLY_METHODS = {"size", "dim", "numel", "ndimension", "is_contiguous", "get_device"}
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def _stochastic_depth() -> Any:
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    return stochastic_depth


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.blocked: list[str | None] = []
        self.producers: list[list[str]] = []

    def new(self, size: int, producer: str | None = None, blocked: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.blocked.append(blocked)
        self.producers.append([producer] if producer else [])
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] != self.size[b]:  # cannot happen in a model that runs; keep it safe anyway
            self.block(a, f"channel counts {self.size[a]} and {self.size[b]} meet")
            self.block(b, f"channel counts {self.size[a]} and {self.size[b]} meet")
            return a
        self.parent[b] = a
        self.blocked[a] = self.blocked[a] or self.blocked[b]
        self.producers[a] += self.producers[b]
        return a

    def block(self, i: int, reason: str) -> None:
        i = self.find(i)
        if self.blocked[i] is None:
            self.blocked[i] = reason


class _Analysis:
    """One pass over a traced region: channel axis of every node, groups merged and blocked, slots."""

    def __init__(
        self, gm: fx.GraphModule, prefix: str, modules: dict[str, nn.Module], params: dict[int, str], pruned: set[str]
    ) -> None:
        self.gm, self.prefix, self.modules, self.params, self.pruned = gm, prefix, modules, params, pruned
        self.uf = _UnionFind()
        self.info: dict[fx.Node, _Info] = {}
        self.slots: dict[tuple[str, int, int], int] = {}  # (tensor, axis, offset) -> group
        self.readers: list[tuple[Reader, int]] = []
        self.opaque: set[str] = set()  # tensors also used where the analysis cannot follow them
        self.opaque_modules: dict[str, str] = {}  # modules called as a whole that the analysis cannot see into
        self.sd = _stochastic_depth()

    # ------------------------------------------------------------------ results
    def run(self, plan: PermutationPlan) -> None:
        for node in self.gm.graph.nodes:
            self.visit(node)
        plan.opaque_modules.update(self.opaque_modules)
        groups: dict[int, ChannelGroup] = {}

        def group(i: int) -> ChannelGroup:
            root = self.uf.find(i)
            if root not in groups:
                groups[root] = ChannelGroup(self.uf.size[root], producers=sorted(set(self.uf.producers[root])))
            return groups[root]

        for (tensor, axis, offset), gid in self.slots.items():
            group(gid).slots.append(Slot(tensor, axis, offset))
            if tensor in self.opaque:
                self.uf.block(gid, f"{tensor} is also used by an op the permutation cannot follow")
        # A layer called twice reads its group once.
        for reader, gid in dict.fromkeys((r, self.uf.find(g)) for r, g in self.readers):
            g = group(gid)
            g.readers.append(reader)
            if reader.offset % 4:
                self.uf.block(gid, f"concatenated at channel {reader.offset} of {reader.layer}, not a multiple of 4")
        for root, g in groups.items():
            g.blocked = self.uf.blocked[self.uf.find(root)]
            if g.blocked is None and g.size % 4:
                g.blocked = f"{g.size} channels: not a multiple of 4"
            if g.blocked is None and g.size < 8:
                g.blocked = f"{g.size} channels: too few to permute"
            if g.readers:
                plan.groups.append(g)

    # ------------------------------------------------------------------ helpers
    def name(self, target: str) -> str:
        return f"{self.prefix}.{target}" if self.prefix else target

    def tensor_name(self, module_name: str, attr: str) -> str | None:
        t = getattr(self.modules[module_name], attr, None)
        return self.params.get(id(t)) if isinstance(t, torch.Tensor) else None

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def get(self, a: Any) -> _Info | None:
        return self.info.get(a) if isinstance(a, fx.Node) else None

    def block(self, info: _Info | None, reason: str) -> None:
        if info is None:
            return
        if info.param is not None:
            self.opaque.add(info.param)
        if info.segs:
            for gid, _ in info.segs:
                self.uf.block(gid, reason)

    def block_all(self, node: fx.Node, reason: str) -> None:
        for a in _flatten((node.args, node.kwargs)):
            self.block(self.get(a), reason)

    def unknown(self, node: fx.Node, why: str) -> _Info:
        return _Info(shape=self.shape(node), why=why)

    def fresh(self, node: fx.Node, axis: int, size: int, producer: str, blocked: str | None = None) -> _Info:
        return _Info(shape=self.shape(node), axis=axis, segs=[(self.uf.new(size, producer, blocked), size)])

    def attach(self, segs: list[tuple[int, int]], tensor: str | None, axis: int) -> None:
        if tensor is None:
            return
        offset = 0
        for gid, length in segs:
            key = (tensor, axis, offset)
            if key in self.slots:
                self.uf.union(self.slots[key], gid)  # a shared tensor: both groups move together
            else:
                self.slots[key] = gid
            offset += length

    def merge(self, a: list[tuple[int, int]], b: list[tuple[int, int]], reason: str) -> None:
        if [n for _, n in a] == [n for _, n in b]:
            for (ga, _), (gb, _) in zip(a, b):
                self.uf.union(ga, gb)
        else:
            for gid, _ in a + b:
                self.uf.block(gid, reason)

    def same(self, x: _Info, node: fx.Node, axis: int | None = None) -> _Info:
        """The output carries the input's channels (at ``axis``, default the same)."""
        return _Info(shape=self.shape(node), axis=x.axis if axis is None else axis, segs=x.segs, why=x.why)

    # ------------------------------------------------------------------ nodes
    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.info[node] = self.unknown(
                node, "the model input" if not self.prefix else f"the input of {self.prefix}"
            )
        elif node.op == "get_attr":
            t = _getattr_path(self.gm, node.target)
            name = self.params.get(id(t)) if isinstance(t, torch.Tensor) else None
            self.info[node] = _Info(shape=tuple(t.shape) if isinstance(t, torch.Tensor) else None, param=name)
        elif node.op == "output":
            self.block_all(
                node, "they are (part of) the model output" if not self.prefix else f"output of {self.prefix}"
            )
        elif node.op == "call_module":
            self.info[node] = self.call_module(node, self.modules[self.name(node.target)], self.name(node.target))
        elif node.op in ("call_function", "call_method"):
            self.info[node] = self.call(node)

    def call(self, node: fx.Node) -> _Info:
        t, args = node.target, node.args
        method = t if node.op == "call_method" else None
        x = self.get(args[0]) if args else None
        if method in _SHAPE_ONLY_METHODS or (t is builtins.getattr and args[1] in ("shape", "dtype", "device", "ndim")):
            return _Info()  # reads the shape only
        if t is operator.getitem and x is not None and x.shape is not None:
            return self.getitem(node, x, args[1])
        if method in ("to", "type_as") and x is not None:  # the other arguments give a dtype/device only
            return self.same(x, node) if x.tracked else self.unknown(node, x.why)
        if t in _UNARY_FUNCS or method in _UNARY_METHODS or (self.sd is not None and t is self.sd):
            return self.elementwise(node, _op_name(node))
        if t in _BINARY_FUNCS or method in _BINARY_METHODS:
            return self.elementwise(node, _op_name(node))
        if t in (torch.cat, torch.concat, torch.concatenate):
            return self.cat(node)
        if x is None or not x.tracked:
            self.block_all(node, f"read by {_op_name(node)}")
            return self.unknown(node, x.why if x is not None and x.why else f"the output of {_op_name(node)}")
        if t in _RESHAPE_FUNCS or method in _RESHAPE_METHODS:
            return self.reshape(node, x)
        if t in (torch.permute, torch.transpose) or method in ("permute", "transpose"):
            return self.permute(node, x)
        if t in _POOL_FUNCS:
            return self.spatial(node, x, _op_name(node))
        if t in (torch.mean, torch.sum, torch.amax, torch.amin) or method in ("mean", "sum", "amax", "amin"):
            return self.reduce(node, x)
        if t is F.layer_norm:
            return self.layer_norm(node, x)
        if t is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            if x.shape is not None and len(pad) // 2 <= len(x.shape) - 1 - x.axis:
                return self.same(x, node)
        if t in (F.softmax, F.log_softmax, torch.softmax) or method in ("softmax", "log_softmax"):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if isinstance(dim, int) and x.shape is not None and dim % len(x.shape) != x.axis:
                return self.same(x, node)
        self.block_all(node, f"read by {_op_name(node)}")
        return self.unknown(node, f"the output of {_op_name(node)}")

    def call_module(self, node: fx.Node, m: nn.Module, name: str) -> _Info:
        x = self.get(node.args[0]) if node.args else None
        kind = f"{type(m).__name__} {name!r}"
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and type(m).forward in _STANDARD_FORWARD:
            return self.conv(node, m, name, x)
        if isinstance(m, nn.Linear) and type(m).forward in _STANDARD_FORWARD:
            return self.linear(node, m, name, x)
        if x is not None and x.tracked and len(node.args) == 1 and not node.kwargs:
            nd = len(x.shape) if x.shape is not None else 0
            if isinstance(m, _ELEMENTWISE_MODULES):
                return self.same(x, node)
            if isinstance(m, nn.PReLU):
                if m.num_parameters > 1 and x.axis == 1:
                    self.attach(x.segs, self.tensor_name(name, "weight"), 0)
                    return self.same(x, node)
                if m.num_parameters == 1:
                    return self.same(x, node)
            if isinstance(m, _BATCHNORMS) and x.axis == 1:
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    self.attach(x.segs, self.tensor_name(name, attr), 0)
                return self.same(x, node)
            if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (x.shape[-1],) and x.axis == nd - 1:
                for attr in ("weight", "bias"):
                    self.attach(x.segs, self.tensor_name(name, attr), 0)
                return self.same(x, node)
            if isinstance(m, nn.GroupNorm) and x.axis == 1 and m.num_groups in (1, m.num_channels):
                for attr in ("weight", "bias"):
                    self.attach(x.segs, self.tensor_name(name, attr), 0)
                return self.same(x, node)
            if isinstance(m, _POOL_MODULES) and not getattr(m, "return_indices", False):
                return self.spatial(node, x, kind)
            if isinstance(m, nn.Flatten):
                return self.reshape(node, x)
            if isinstance(m, (nn.Softmax, nn.LogSoftmax)) and m.dim is not None and m.dim % nd != x.axis:
                return self.same(x, node)
        passthrough = (
            *_ELEMENTWISE_MODULES,
            nn.PReLU,
            *_BATCHNORMS,
            nn.LayerNorm,
            nn.GroupNorm,
            *_POOL_MODULES,
            nn.Flatten,
        )
        if x is not None and not x.tracked and x.why and isinstance(m, passthrough):
            return self.unknown(node, x.why)  # keep saying where the unknown layout comes from
        self.opaque_modules[name] = type(m).__name__
        why = f"read by {kind}"
        if isinstance(m, _LAYERS):
            why = f"read by {kind}, a subclass with its own forward"
        self.block_all(node, why)
        for p in m.parameters():
            if id(p) in self.params:
                self.opaque.add(self.params[id(p)])
        return self.unknown(node, f"the output of {kind}")

    # ------------------------------------------------------------------ layers
    def consume(self, x: _Info | None, node: fx.Node, layer: str, weight: str | None, size: int, axis: int) -> None:
        """Attach a layer's input-channel axis (weight axis 1) to its input's groups."""
        ok = x is not None and x.tracked and x.axis == axis and sum(n for _, n in x.segs) == size
        if not ok:
            if x is not None and x.tracked:
                self.block(x, f"read by {layer!r} along another axis")
            why = x.why if x is not None and x.why else "of unknown layout"
            segs = [(self.uf.new(size, None, f"its input channels are {why}"), size)]
        else:
            segs = x.segs  # type: ignore[assignment]
        self.attach(segs, weight, 1)
        if layer in self.pruned and weight is not None:
            offset = 0
            for gid, n in segs:
                self.readers.append((Reader(layer, weight, offset), gid))
                offset += n

    def conv(self, node: fx.Node, m: nn.Conv1d | nn.Conv2d, name: str, x: _Info | None) -> _Info:
        out_shape = self.shape(node)
        spatial = 1 if isinstance(m, nn.Conv1d) else 2
        axis = len(out_shape) - spatial - 1 if out_shape else 1
        w, b = self.tensor_name(name, "weight"), self.tensor_name(name, "bias")
        if m.groups == 1:
            self.consume(x, node, name, w, m.in_channels, axis)
            out = self.fresh(node, axis, m.out_channels, name)
        elif m.groups == m.in_channels == m.out_channels and x is not None and x.tracked and x.axis == axis:
            out = self.same(x, node)  # depthwise: channel c in, channel c out (weight axis 1 has size 1)
        else:
            if m.groups == m.in_channels == m.out_channels:
                why = f"its input channels are {x.why if x is not None and x.why else 'of unknown layout'}"
            else:
                why = f"produced by grouped conv {name!r} (groups={m.groups})"
                self.block(x, f"read by grouped conv {name!r} (groups={m.groups})")
            return self.fresh(node, axis, m.out_channels, name, blocked=why)
        self.attach(out.segs, w, 0)  # type: ignore[arg-type]
        self.attach(out.segs, b, 0)  # type: ignore[arg-type]
        return out

    def linear(self, node: fx.Node, m: nn.Linear, name: str, x: _Info | None) -> _Info:
        out_shape = self.shape(node)
        axis = len(out_shape) - 1 if out_shape else 1
        w, b = self.tensor_name(name, "weight"), self.tensor_name(name, "bias")
        self.consume(x, node, name, w, m.in_features, axis)
        out = self.fresh(node, axis, m.out_features, name)
        self.attach(out.segs, w, 0)  # type: ignore[arg-type]
        self.attach(out.segs, b, 0)  # type: ignore[arg-type]
        return out

    def layer_norm(self, node: fx.Node, x: _Info) -> _Info:
        args = list(node.args) + [None] * 5
        shape = args[1] if args[1] is not None else node.kwargs.get("normalized_shape")
        weight = args[2] if args[2] is not None else node.kwargs.get("weight")
        bias = args[3] if args[3] is not None else node.kwargs.get("bias")
        nd = len(x.shape) if x.shape else 0
        if list(shape or []) == [x.shape[-1]] and x.axis == nd - 1:
            for a in (weight, bias):
                info = self.get(a)
                if info is not None and info.param is not None:
                    self.attach(x.segs, info.param, 0)
                elif a is not None:
                    self.block(x, "layer_norm with a computed weight")
            return self.same(x, node)
        self.block_all(node, "read by layer_norm across channels")
        return self.unknown(node, "the output of layer_norm")

    # ------------------------------------------------------------------ ops
    def elementwise(self, node: fx.Node, op: str) -> _Info:
        """Same-shape ops with broadcasting: operands carrying channels on the same axis move together."""
        out = self.shape(node)
        operands = [self.info.get(a) for a in _flatten((node.args, node.kwargs)) if isinstance(a, fx.Node)]
        operands = [i for i in operands if i is not None and (i.shape is not None or i.tracked)]
        tracked = [i for i in operands if i.tracked and i.shape is not None]
        if out is None or not tracked:
            self.block_all(node, f"read by {op}")
            why = next((i.why for i in operands if i.why), f"the output of {op}")
            return self.unknown(node, why)
        n = len(out)
        # The operand whose channels are the output's (not one broadcast along them).
        lead = next((i for i in tracked if i.shape[i.axis] == out[i.axis + n - len(i.shape)]), tracked[0])  # type: ignore[index,operator]
        axis = lead.axis + n - len(lead.shape)  # type: ignore[operator,arg-type]
        size = out[axis]
        for info in operands:
            if info is lead:
                continue
            sh = info.shape or ()
            own = axis - (n - len(sh))  # the operand's axis that broadcasting aligns with the channels
            size_at = sh[own] if 0 <= own < len(sh) else 1
            if info.tracked and info.axis == own and size_at == size:
                self.merge(lead.segs, info.segs, f"combined by {op} with channels laid out differently")  # type: ignore[arg-type]
            elif info.tracked and info.axis == own and size_at == 1:
                self.block(info, f"a single channel broadcast by {op}")
            elif info.tracked:
                reason = f"combined by {op} with channels on another axis"
                self.block(lead, reason)
                self.block(info, reason)
            elif size_at == 1:
                continue  # the same for every channel
            elif info.param is not None and size_at == size:
                self.attach(lead.segs, info.param, own)  # type: ignore[arg-type]
            else:
                self.block(lead, f"combined by {op} with {info.why or 'a tensor the permutation cannot follow'}")
        return _Info(shape=out, axis=axis, segs=lead.segs)

    def reshape(self, node: fx.Node, x: _Info) -> _Info:
        out = self.shape(node)
        axis = _reshaped_axis(x.shape, x.axis, out) if out is not None and x.shape is not None else None
        if axis is None:
            self.block(x, f"reshaped by {_op_name(node)} together with other dimensions")
            return self.unknown(node, f"a reshape ({_op_name(node)}) that mixes channels with other dimensions")
        return self.same(x, node, axis)

    def permute(self, node: fx.Node, x: _Info) -> _Info:
        nd = len(x.shape) if x.shape else 0
        rest = list(node.args[1:]) or list(node.kwargs.values())
        if node.target in ("transpose", torch.transpose):
            d0, d1 = (int(d) % nd for d in rest[:2])
            order = list(range(nd))
            order[d0], order[d1] = order[d1], order[d0]
        else:
            order = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
            order = [int(d) % nd for d in order]
        return self.same(x, node, order.index(x.axis))

    def spatial(self, node: fx.Node, x: _Info, what: str) -> _Info:
        out = self.shape(node)
        if x.axis == 1 and out is not None and len(out) == len(x.shape) and out[1] == x.shape[1]:  # type: ignore[arg-type]
            return self.same(x, node)
        self.block(x, f"read by {what} along the channels")
        return self.unknown(node, f"the output of {what}")

    def reduce(self, node: fx.Node, x: _Info) -> _Info:
        nd = len(x.shape)  # type: ignore[arg-type]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        if dim is None:
            self.block(x, f"reduced over all dimensions by {_op_name(node)}")
            return self.unknown(node, "a full reduction")
        dims = {int(d) % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if x.axis in dims:
            self.block(x, f"reduced over the channels by {_op_name(node)}")
            return self.unknown(node, "a reduction over channels")
        axis = x.axis if keep else x.axis - sum(d < x.axis for d in dims)  # type: ignore[operator]
        return self.same(x, node, axis)

    def cat(self, node: fx.Node) -> _Info:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        infos = [self.get(t) for t in tensors]
        out = self.shape(node)
        if out is None or any(i is None or not i.tracked for i in infos):
            self.block_all(node, "concatenated with a tensor of unknown layout")
            return self.unknown(node, "a concatenation")
        nd = len(out)
        d = int(dim) % nd
        if all(i.axis == d for i in infos):  # type: ignore[union-attr]
            return _Info(shape=out, axis=d, segs=[s for i in infos for s in i.segs])  # type: ignore[union-attr,misc]
        if all(i.axis == infos[0].axis for i in infos):  # type: ignore[union-attr]
            for i in infos[1:]:
                self.merge(infos[0].segs, i.segs, "concatenated with channels laid out differently")  # type: ignore[union-attr,arg-type]
            return self.same(infos[0], node)  # type: ignore[arg-type]
        self.block_all(node, "concatenated with a different channel axis")
        return self.unknown(node, "a concatenation")

    def getitem(self, node: fx.Node, x: _Info, index: Any) -> _Info:
        if not x.tracked:
            return self.unknown(node, x.why or "an indexed tensor")
        idx = index if isinstance(index, tuple) else (index,)
        nd = len(x.shape)  # type: ignore[arg-type]
        if sum(i is Ellipsis for i in idx) > 1 or any(
            not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in idx
        ):
            self.block(x, "indexed along the channels")
            return self.unknown(node, "an indexed tensor")
        consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in idx:
            expanded += [slice(None)] * (nd - consumed) if i is Ellipsis else [i]
        expanded += [slice(None)] * (nd - sum(1 for i in expanded if i is not None))
        src = out = 0
        for i in expanded:
            if i is None:
                out += 1
                continue
            if src == x.axis:
                if isinstance(i, slice) and i == slice(None):
                    return self.same(x, node, out)
                self.block(x, "indexed along the channels")
                return self.unknown(node, "channels selected by indexing")
            src += 1
            out += 0 if isinstance(i, int) else 1
        return self.unknown(node, "an indexed tensor")  # pragma: no cover - axis always reached


def _reshaped_axis(shape: tuple[int, ...], axis: int, out: tuple[int, ...]) -> int | None:
    """Where channel ``axis`` of ``shape`` lands in ``out`` when the reshape keeps it whole, else None.

    The channel index keeps its place in the flat layout exactly when some output dimension has its
    size and the dimensions before it hold as many elements as those before the channel axis.
    """
    before = 1
    for d in shape[:axis]:
        before *= d
    acc = 1
    for j, d in enumerate(out):
        if acc == before and d == shape[axis]:
            return j
        acc *= d
    return None


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return f".{t}()"
    return getattr(t, "__name__", str(t))


def _getattr_path(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _flatten(x: Any) -> Iterator[Any]:
    if isinstance(x, (list, tuple)):
        for i in x:
            yield from _flatten(i)
    elif isinstance(x, dict):
        for i in x.values():
            yield from _flatten(i)
    elif isinstance(x, slice):
        yield from _flatten((x.start, x.stop, x.step))
    else:
        yield x
