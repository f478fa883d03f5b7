"""The permutation plan: channel groups (what moves together, which pruned layers read them, whether they can
move) and, for each pruned layer, why its input channels stay in place when they do (see :mod:`.graph`)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        >>> import torch
        >>> from torch import nn
        >>> from qatsparse.sparsity.permutation.graph import find_channel_groups
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
