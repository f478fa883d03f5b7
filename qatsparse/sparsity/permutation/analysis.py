"""The channel analysis of one traced region: the channel axis of every node's output, followed through the ops,
the groups merged (residual additions, elementwise ops), laid side by side (concatenation) or blocked with the
reason, and every tensor slice that moves with a group.

One algorithm in one class, kept whole: each op's rule reads and updates the same state (node infos, the
union-find, slots, readers); the vocabulary of ops is in :mod:`.channel_ops`.
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from qatsparse.sparsity.permutation.channel_ops import (
    BATCHNORMS,
    BINARY_FUNCS,
    BINARY_METHODS,
    ELEMENTWISE_MODULES,
    LAYERS,
    POOL_FUNCS,
    POOL_MODULES,
    RESHAPE_FUNCS,
    RESHAPE_METHODS,
    SHAPE_ONLY_METHODS,
    STANDARD_FORWARD,
    UNARY_FUNCS,
    UNARY_METHODS,
    flatten_args,
    getattr_path,
    op_name,
    reshaped_axis,
    stochastic_depth_op,
)
from qatsparse.sparsity.permutation.plan import ChannelGroup, PermutationPlan, Reader, Slot
from qatsparse.sparsity.permutation.union_find import UnionFind


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


class ChannelAnalysis:
    """One pass over a traced region: channel axis of every node, groups merged and blocked, slots.

    Example (what :func:`~qatsparse.sparsity.permutation.graph.find_channel_groups` does per region):
        >>> from torch.fx.passes.shape_prop import ShapeProp
        >>> m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)); gm = fx.symbolic_trace(m)
        >>> _ = ShapeProp(gm).propagate(torch.zeros(2, 16)); plan = PermutationPlan()
        >>> params = {id(t): n for n, t in m.named_parameters()}
        >>> ChannelAnalysis(gm, "", dict(m.named_modules()), params, {"2"}).run(plan); [g.size for g in plan.groups]
        [32]
    """

    def __init__(
        self, gm: fx.GraphModule, prefix: str, modules: dict[str, nn.Module], params: dict[int, str], pruned: set[str]
    ) -> None:
        self.gm, self.prefix, self.modules, self.params, self.pruned = gm, prefix, modules, params, pruned
        self.uf = UnionFind()
        self.info: dict[fx.Node, _Info] = {}
        self.slots: dict[tuple[str, int, int], int] = {}  # (tensor, axis, offset) -> group
        self.readers: list[tuple[Reader, int]] = []
        self.opaque: set[str] = set()  # tensors also used where the analysis cannot follow them
        self.opaque_modules: dict[str, str] = {}  # modules called as a whole that the analysis cannot see into
        self.sd = stochastic_depth_op()

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
        for a in flatten_args((node.args, node.kwargs)):
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
            t = getattr_path(self.gm, node.target)
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
        if method in SHAPE_ONLY_METHODS or (t is builtins.getattr and args[1] in ("shape", "dtype", "device", "ndim")):
            return _Info()  # reads the shape only
        if t is operator.getitem and x is not None and x.shape is not None:
            return self.getitem(node, x, args[1])
        if method in ("to", "type_as") and x is not None:  # the other arguments give a dtype/device only
            return self.same(x, node) if x.tracked else self.unknown(node, x.why)
        if t in UNARY_FUNCS or method in UNARY_METHODS or (self.sd is not None and t is self.sd):
            return self.elementwise(node, op_name(node))
        if t in BINARY_FUNCS or method in BINARY_METHODS:
            return self.elementwise(node, op_name(node))
        if t in (torch.cat, torch.concat, torch.concatenate):
            return self.cat(node)
        if x is None or not x.tracked:
            self.block_all(node, f"read by {op_name(node)}")
            return self.unknown(node, x.why if x is not None and x.why else f"the output of {op_name(node)}")
        if t in RESHAPE_FUNCS or method in RESHAPE_METHODS:
            return self.reshape(node, x)
        if t in (torch.permute, torch.transpose) or method in ("permute", "transpose"):
            return self.permute(node, x)
        if t in POOL_FUNCS:
            return self.spatial(node, x, op_name(node))
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
        self.block_all(node, f"read by {op_name(node)}")
        return self.unknown(node, f"the output of {op_name(node)}")

    def call_module(self, node: fx.Node, m: nn.Module, name: str) -> _Info:
        x = self.get(node.args[0]) if node.args else None
        kind = f"{type(m).__name__} {name!r}"
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and type(m).forward in STANDARD_FORWARD:
            return self.conv(node, m, name, x)
        if isinstance(m, nn.Linear) and type(m).forward in STANDARD_FORWARD:
            return self.linear(node, m, name, x)
        if x is not None and x.tracked and len(node.args) == 1 and not node.kwargs:
            nd = len(x.shape) if x.shape is not None else 0
            if isinstance(m, ELEMENTWISE_MODULES):
                return self.same(x, node)
            if isinstance(m, nn.PReLU):
                if m.num_parameters > 1 and x.axis == 1:
                    self.attach(x.segs, self.tensor_name(name, "weight"), 0)
                    return self.same(x, node)
                if m.num_parameters == 1:
                    return self.same(x, node)
            if isinstance(m, BATCHNORMS) and x.axis == 1:
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
            if isinstance(m, POOL_MODULES) and not getattr(m, "return_indices", False):
                return self.spatial(node, x, kind)
            if isinstance(m, nn.Flatten):
                return self.reshape(node, x)
            if isinstance(m, (nn.Softmax, nn.LogSoftmax)) and m.dim is not None and m.dim % nd != x.axis:
                return self.same(x, node)
        passthrough = (
            *ELEMENTWISE_MODULES,
            nn.PReLU,
            *BATCHNORMS,
            nn.LayerNorm,
            nn.GroupNorm,
            *POOL_MODULES,
            nn.Flatten,
        )
        if x is not None and not x.tracked and x.why and isinstance(m, passthrough):
            return self.unknown(node, x.why)  # keep saying where the unknown layout comes from
        self.opaque_modules[name] = type(m).__name__
        why = f"read by {kind}"
        if isinstance(m, LAYERS):
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
        operands = [self.info.get(a) for a in flatten_args((node.args, node.kwargs)) if isinstance(a, fx.Node)]
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
        axis = reshaped_axis(x.shape, x.axis, out) if out is not None and x.shape is not None else None
        if axis is None:
            self.block(x, f"reshaped by {op_name(node)} together with other dimensions")
            return self.unknown(node, f"a reshape ({op_name(node)}) that mixes channels with other dimensions")
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
            self.block(x, f"reduced over all dimensions by {op_name(node)}")
            return self.unknown(node, "a full reduction")
        dims = {int(d) % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if x.axis in dims:
            self.block(x, f"reduced over the channels by {op_name(node)}")
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
