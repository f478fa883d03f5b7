"""Channel permutations for 2:4: reorder input channels so that 2:4 pruning keeps more magnitude.

Three steps, each a pure function of the model:

1. :func:`find_channel_groups` (``graph.py``): which channels must move together, what moves with
   them, and which pruned layers cannot be permuted (with the reason).
2. :func:`search_channel_permutations`: for every permutable group, the order of its channels that
   maximises the magnitude its pruned readers keep under 2:4 (``search.py``).
3. :func:`apply_channel_permutations` (``apply.py``): reorder the weights, biases, BatchNorm statistics,
   gradients and optimizer state in place. The model computes the same function afterwards.

:func:`permute_for_2to4` runs the three. See docs/sparsity.md ("Channel permutation").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qatsparse.sparsity.permutation.apply import inverse, optimizer_problem, permute_slots, reader_matrix
from qatsparse.sparsity.permutation.graph import find_channel_groups
from qatsparse.sparsity.permutation.plan import ChannelGroup, PermutationPlan, Reader, Slot
from qatsparse.sparsity.permutation.search import SearchConfig, SearchStats, kept_sum, search_permutation

__all__ = [
    "ChannelGroup",
    "GroupResult",
    "Move",
    "PermutationPlan",
    "PermutationResult",
    "Reader",
    "SearchConfig",
    "SearchStats",
    "Slot",
    "apply_channel_permutations",
    "find_channel_groups",
    "inverse",
    "kept_sum",
    "permute_for_2to4",
    "search_channel_permutations",
    "search_permutation",
    "undo_channel_permutations",
]


@dataclass
class Move:
    """One channel group's permutation: the tensor slices to reorder and the new order of the channels."""

    slots: list[Slot]
    perm: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"slots": [(s.tensor, s.axis, s.offset) for s in self.slots], "perm": self.perm.cpu().tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Move:
        return cls([Slot(*s) for s in d["slots"]], torch.tensor(d["perm"], dtype=torch.long))


@dataclass
class GroupResult:
    """What the search did for one channel group (magnitudes are its readers' sums of ``|w|``)."""

    size: int
    readers: list[str]
    producers: list[str]
    kept_before: float
    kept_after: float
    total: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PermutationResult:
    """The plan, the permutations found (``moves``, only groups that changed), per-group statistics.

    Example:
        >>> m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        >>> r = permute_for_2to4(m, (torch.randn(2, 16),), ["0", "2"]); sorted(r.not_permuted)
        ['0']
    """

    plan: PermutationPlan
    moves: list[Move] = field(default_factory=list)
    groups: list[GroupResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def not_permuted(self) -> dict[str, str]:
        return self.plan.not_permuted

    def summary(self) -> dict[str, Any]:
        """JSON-friendly: groups searched/moved, time, the layers left unpermuted with reasons."""
        return {
            "groups_searched": len(self.groups),
            "groups_moved": len(self.moves),
            "channels_moved": sum(m.perm.numel() for m in self.moves),
            "search_seconds": round(self.seconds, 3),
            "permuted_layers": self.plan.permuted_layers,
            "not_permuted": dict(self.plan.not_permuted),
            "notes": dict(self.plan.notes),
            "groups": [g.to_dict() for g in self.groups],
        }


def search_channel_permutations(
    model: nn.Module,
    example_inputs: Sequence[Any],
    pruned: Sequence[str],
    optimizers: Sequence[torch.optim.Optimizer] = (),
    config: SearchConfig | None = None,
    example_kwargs: dict | None = None,
) -> PermutationResult:
    """Find, for every permutable channel group, the channel order that keeps most under 2:4 (model unchanged).

    Groups whose optimizer state cannot be permuted (see
    :func:`~qatsparse.sparsity.permutation.apply.optimizer_problem`) are blocked with that reason.
    """
    t0 = time.perf_counter()
    plan = find_channel_groups(model, example_inputs, pruned, example_kwargs)
    result = PermutationResult(plan)
    for g in plan.groups:
        if g.permutable and (why := optimizer_problem(model, g.slots, optimizers)) is not None:
            g.blocked = why
            for r in g.readers:
                plan.not_permuted.setdefault(r.layer, why)
        if not g.permutable:
            continue
        matrix = reader_matrix(model, g)
        perm, stats = search_permutation(matrix, config)
        result.groups.append(
            GroupResult(
                size=g.size,
                readers=[r.layer for r in g.readers],
                producers=g.producers,
                kept_before=stats.kept_before,
                kept_after=stats.kept_after,
                total=stats.total,
                seconds=stats.seconds,
            )
        )
        if not torch.equal(perm, torch.arange(g.size, device=perm.device)):
            result.moves.append(Move(list(g.slots), perm.cpu()))
    for layer in plan.permuted_layers:
        plan.not_permuted.pop(layer, None)
    result.seconds = time.perf_counter() - t0
    return result


def apply_channel_permutations(
    model: nn.Module, moves: Sequence[Move], optimizers: Sequence[torch.optim.Optimizer] = ()
) -> None:
    """Apply each move in place (parameters, buffers, gradients, optimizer state)."""
    for move in moves:
        permute_slots(model, move.slots, move.perm, optimizers)


def undo_channel_permutations(
    model: nn.Module, moves: Sequence[Move], optimizers: Sequence[torch.optim.Optimizer] = ()
) -> None:
    """Undo :func:`apply_channel_permutations` (in reverse order)."""
    for move in reversed(moves):
        permute_slots(model, move.slots, inverse(move.perm), optimizers)


def permute_for_2to4(
    model: nn.Module,
    example_inputs: Sequence[Any],
    pruned: Sequence[str],
    optimizers: Sequence[torch.optim.Optimizer] = (),
    config: SearchConfig | None = None,
) -> PermutationResult:
    """Search and apply channel permutations so that 2:4 pruning of ``pruned`` keeps more magnitude.

    The model computes the same function afterwards (up to floating-point summation order).

    Example:
        >>> _ = torch.manual_seed(0); m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
        >>> x = torch.randn(4, 16); before = m(x)
        >>> r = permute_for_2to4(m, (x[:2],), ["2"])
        >>> bool((m(x) - before).abs().max() < 1e-5), r.groups[0].kept_after > r.groups[0].kept_before
        (True, True)
    """
    result = search_channel_permutations(model, example_inputs, pruned, optimizers, config)
    apply_channel_permutations(model, result.moves, optimizers)
    return result
