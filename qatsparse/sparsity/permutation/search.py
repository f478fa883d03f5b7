"""Search a column permutation of a weight matrix that keeps more magnitude under 2:4 pruning.

The objective (Pool & Yu, "Channel Permutations for N:M Sparsity", NeurIPS 2021; apex ASP's
``permutation_search_kernels``): for a matrix ``X`` of weight magnitudes with one column per input
channel (rows: every output channel and kernel tap of every layer that reads those channels), find
the order of the columns that maximises the sum, over rows and over groups of 4 consecutive columns,
of the 2 largest entries -- the magnitude that 2:4 pruning keeps.

What is implemented (apex's ideas, re-written as batched tensor code that runs on the weights' device):

1. **Start** from the better of the identity and a norm-interleaved order (columns sorted by L1 norm
   and dealt so that each group of 4 gets one column of each quartile).
2. **Channel swaps** (apex's "progressive channel swap", made exhaustive and greedy): the gain of every
   swap of two columns in different groups is computed at once, as a ``C x C`` matrix; the best swaps
   on disjoint pairs of groups (their gains add exactly) are applied together, and only the rows of
   that matrix whose groups changed are recomputed. For a position ``a`` whose other three group
   members have, per row, top-two sum ``T`` and second largest ``m``, the group keeps
   ``T + relu(x - m)`` when column ``x`` moves in -- so one round is a relu-sum over
   ``C x C x rows``, computed with ``torch.cdist(p=1)``. Every chosen swap is re-checked exactly
   before it is applied, so the objective never decreases. Matrices with more than ``max_rows`` rows
   descend first on the ``max_rows`` rows of largest L1 norm (coarse), then on all rows (``exact``).
3. **Exhaustive stripe-group search** (apex's ``Exhaustive_Search`` with a window of 8 columns): for a
   pair of groups, all 35 ways of splitting their 8 columns into two groups of 4 are tried at once,
   which finds the 2-for-2 exchanges single swaps cannot. Applied to the pairs of groups ranked best
   by the swap matrix, as many as ``exhaustive_budget`` (row x partition evaluations) allows; any
   improvement sends the search back to step 2.
4. **Escapes** (apex's ``escape_attempts``): from the local optimum, a seeded random swap, a new
   descent; the result is kept only when it beats the best so far.

What each step is worth and costs, measured: docs/sparsity.md ("Channel permutation").

Every quantity is deterministic for a given input, device and configuration (seeded generator, stable
tie-breaking, no wall-clock limit): a resumed run or another rank finds the same permutation.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: For each position in a group of 4, the other three.
_OTHERS = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])


def _partitions_of_8() -> torch.Tensor:
    """The 35 ways to split 8 columns into two groups of 4 (first group holds column 0); identity first."""
    rows = []
    for rest in itertools.combinations(range(1, 8), 3):
        first = (0, *rest)
        rows.append([*first, *(c for c in range(8) if c not in first)])
    return torch.tensor(rows)


_PARTITIONS = _partitions_of_8()


@dataclass(frozen=True)
class SearchConfig:
    """Budget of :func:`search_permutation`; every limit counts work, never wall time (deterministic).

    Args:
        max_rounds: rounds of simultaneous swaps per descent.
        max_rows: matrices with more rows first descend on this many rows (those of largest L1 norm);
            0 skips that coarse descent.
        exact: after the coarse descent, descend on all rows (gains exact). ``False`` stops after the
            coarse descent (faster on large layers, keeps less).
        exhaustive_budget: row x partition evaluations spent per matrix block on the 35-way search
            over pairs of groups (0 turns it off).
        escapes: random restarts from the best order found (0 turns them off).
        max_channels: larger matrices are searched in contiguous blocks of this many columns (memory
            of the ``C x C`` gain matrix); a multiple of 4.
        seed: seed of the escapes' random swaps.

    Example:
        >>> SearchConfig(escapes=0).escapes
        0
    """

    max_rounds: int = 200
    max_rows: int = 512
    exact: bool = True
    exhaustive_budget: float = 5e7
    escapes: int = 0
    max_channels: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_rounds", "max_rows", "escapes", "max_channels"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(f"SearchConfig.{name} must be an integer >= 0, got {value!r}")
        if self.max_channels < 8 or self.max_channels % 4:
            raise ValueError(f"SearchConfig.max_channels must be a multiple of 4 and >= 8, got {self.max_channels}")
        if self.exhaustive_budget < 0:
            raise ValueError(f"SearchConfig.exhaustive_budget must be >= 0, got {self.exhaustive_budget}")


@dataclass
class SearchStats:
    """What one search did: magnitude kept before/after (sums), swaps, exhaustive wins, seconds."""

    kept_before: float = 0.0
    kept_after: float = 0.0
    total: float = 0.0
    swaps: int = 0
    exhaustive: int = 0
    escapes_won: int = 0
    seconds: float = 0.0


def group_kept(x: torch.Tensor) -> torch.Tensor:
    """Sum of the 2 largest of the last dimension (of size 4): the magnitude 2:4 keeps of one group.

    Example:
        >>> group_kept(torch.tensor([[1.0, 4.0, 2.0, 3.0]])).tolist()
        [7.0]
    """
    a, b, c, d = x.unbind(-1)
    hi1, lo1 = torch.maximum(a, b), torch.minimum(a, b)
    hi2, lo2 = torch.maximum(c, d), torch.minimum(c, d)
    return torch.maximum(hi1, hi2) + torch.maximum(torch.minimum(hi1, hi2), torch.maximum(lo1, lo2))


def kept_sum(x: torch.Tensor) -> float:
    """Magnitude kept by 2:4 along the columns of a non-negative ``(rows, C)`` matrix (C a multiple of 4).

    Example:
        >>> kept_sum(torch.tensor([[1.0, 4.0, 2.0, 3.0, 0.0, 0.0, 1.0, 1.0]]))
        9.0
    """
    return float(group_kept(x.reshape(x.shape[0], -1, 4)).sum(dtype=torch.float64))


def search_permutation(
    magnitudes: torch.Tensor, config: SearchConfig | None = None
) -> tuple[torch.Tensor, SearchStats]:
    """A column order of ``magnitudes`` (``(rows, C)``, C a multiple of 4) that keeps more under 2:4.

    Returns ``(perm, stats)``: ``magnitudes[:, perm]`` keeps at least as much as ``magnitudes``
    (the identity is returned when nothing better is found). Runs on ``magnitudes``' device.

    Example:
        >>> x = torch.tensor([[9.0, 8.0, 7.0, 6.0, 1.0, 1.0, 1.0, 1.0]])  # the four large ones in one group
        >>> perm, stats = search_permutation(x)  # 2:4 keeps 9 + 8 + 1 + 1 as they are; 9 + 8 + 7 + 6 when split
        >>> stats.kept_before, stats.kept_after
        (19.0, 30.0)
        >>> stats.kept_after > stats.kept_before
        True
    """
    cfg = config or SearchConfig()
    x = magnitudes.detach().abs().float()
    if x.dim() != 2 or x.shape[1] % 4:
        raise ValueError(f"expected a (rows, C) matrix with C a multiple of 4, got shape {tuple(x.shape)}")
    with _threads_for(x):
        return _search(x, cfg)


@contextlib.contextmanager
def _threads_for(x: torch.Tensor) -> Iterator[None]:
    """One CPU thread for small matrices: the search is many small ops, whose cost on a busy machine is
    mostly the synchronisation of the intra-op thread pool, not arithmetic."""
    small = x.device.type == "cpu" and x.numel() * x.shape[1] < 2**24
    before = torch.get_num_threads()
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _search(x: torch.Tensor, cfg: SearchConfig) -> tuple[torch.Tensor, SearchStats]:
    t0 = time.perf_counter()
    c = x.shape[1]
    stats = SearchStats(total=float(x.sum(dtype=torch.float64)), kept_before=kept_sum(x))
    perm = torch.arange(c, device=x.device)
    for start in range(0, c, cfg.max_channels):
        block = slice(start, min(c, start + cfg.max_channels))
        if block.stop - block.start >= 8:
            sub, sub_stats = _search_block(x[:, block], cfg)
            perm[block] = perm[block][sub]
            stats.swaps += sub_stats.swaps
            stats.exhaustive += sub_stats.exhaustive
            stats.escapes_won += sub_stats.escapes_won
    stats.kept_after = kept_sum(x[:, perm])
    if stats.kept_after <= stats.kept_before:
        perm, stats.kept_after = torch.arange(c, device=x.device), stats.kept_before
    stats.seconds = time.perf_counter() - t0
    return perm, stats


def _search_block(x: torch.Tensor, cfg: SearchConfig) -> tuple[torch.Tensor, SearchStats]:
    stats = SearchStats()
    perm = _initial_order(x)
    if cfg.max_rows and x.shape[0] > cfg.max_rows:
        # Coarse descent on the rows that carry the most magnitude, then the exact one from there:
        # the exact descent then starts close to its optimum, and its many small updates are few.
        rows = torch.topk(x.sum(1), cfg.max_rows).indices.sort().values
        coarse = _State(x, perm, cfg, rows)
        coarse.descend(stats, exhaustive=False)
        perm = coarse.perm
        if not cfg.exact:
            return perm, stats
    state = _State(x, perm, cfg)
    state.descend(stats, exhaustive=True)
    best_perm, best = state.perm.clone(), state.kept()
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.escapes):
        state.perturb(gen)
        state.descend(stats, exhaustive=False)
        kept = state.kept()
        if kept > best * (1 + 1e-7):
            best_perm, best = state.perm.clone(), kept
            stats.escapes_won += 1
        else:
            state.reset(best_perm)
    return best_perm, stats


def _disjoint(first: list[int], second: list[int]) -> list[int]:
    """Indices of the candidates (best first) kept greedily so that no group is used twice.

    Example:
        >>> _disjoint([0, 0, 2], [1, 2, 3])
        [0, 2]
    """
    used: set[int] = set()
    out = []
    for i, (a, b) in enumerate(zip(first, second)):
        if a not in used and b not in used:
            used.update((a, b))
            out.append(i)
    return out


def _initial_order(x: torch.Tensor) -> torch.Tensor:
    """The identity, or columns dealt by L1 norm one per quartile into each group when that keeps more."""
    c = x.shape[1]
    identity = torch.arange(c, device=x.device)
    by_norm = torch.sort(x.sum(0), descending=True, stable=True).indices
    dealt = by_norm.view(4, c // 4).t().reshape(-1)
    return dealt if kept_sum(x[:, dealt]) > kept_sum(x) else identity


class _State:
    """Swap descent on one block: the permutation, the estimated gain matrix, exact checks on ``x``."""

    def __init__(
        self, x: torch.Tensor, perm: torch.Tensor, cfg: SearchConfig, rows: torch.Tensor | None = None
    ) -> None:
        self.x, self.cfg = x, cfg
        # (C, rows') by content: the rows the swap gains are computed on (all: exact gains)
        self.xs_t = (x if rows is None else x[rows]).t().contiguous()
        self.c = x.shape[1]
        self.s = self.c // 4
        self.tol = 1e-6 * float(x.sum()) / max(self.c, 1)
        self.partitions = _PARTITIONS.to(x.device)
        self.others = _OTHERS.to(x.device)
        self.budget = cfg.exhaustive_budget  # what the 35-way search may still spend on this block
        self.reset(perm)

    # ---------------------------------------------------------------- bookkeeping
    def reset(self, perm: torch.Tensor) -> None:
        self.perm = perm.clone()
        self.h = torch.empty(self.c, self.c, device=self.x.device)  # (position, content)
        self._refresh(torch.arange(self.s, device=self.x.device))

    def kept(self) -> float:
        return kept_sum(self.x[:, self.perm])

    def _refresh(self, stripes: torch.Tensor) -> None:
        """Recompute per-position terms, and the gain rows of the positions in ``stripes``."""
        xp = self.xs_t[self.perm].t().reshape(-1, self.s, 4)  # (rows', S, 4) in position order
        others = xp[..., self.others]  # (rows', S, 4, 3)
        lo, hi, total = others.amin(-1), others.amax(-1), others.sum(-1)
        top2 = (total - lo).reshape(xp.shape[0], -1)  # the other three's kept, per position
        second = (total - hi - lo).reshape(xp.shape[0], -1)  # their second largest
        kept = group_kept(xp).repeat_interleave(4, dim=1)
        self.base = (top2 - kept).sum(0)  # gain of a position, before what moves in
        pos = (stripes[:, None] * 4 + torch.arange(4, device=stripes.device)).reshape(-1)
        m = second.t()[pos]  # (positions, rows')
        # sum_r relu(x_j - m_a) = (|x_j - m_a|_1 + sum x_j - sum m_a) / 2, with cdist's fused L1 kernel.
        l1 = torch.cdist(m[None], self.xs_t[None], p=1)[0]
        self.h[pos] = (l1 + self.xs_t.sum(1)[None] - m.sum(1)[:, None]) / 2

    def _stripe_kept(self, cols: torch.Tensor) -> torch.Tensor:
        """Exact kept magnitude of each group of 4 positions in ``cols`` (…, 4), on all rows."""
        return group_kept(self.x[:, self.perm[cols]]).sum(0)

    # ---------------------------------------------------------------- moves
    def descend(self, stats: SearchStats, exhaustive: bool) -> None:
        """Swap rounds to a local optimum; then (``exhaustive``) the 35-way search while its budget lasts."""
        while True:
            for _ in range(self.cfg.max_rounds):
                if not self._swap_round(stats):
                    break
            if not exhaustive or not self._exhaustive_round(stats):
                return

    def _swap_gains(self) -> torch.Tensor:
        hp = self.h[:, self.perm]  # (position p, position q): gain term of q's content moving into p
        d = self.base[:, None] + self.base[None, :] + hp + hp.t()
        d = d.view(self.s, 4, self.s, 4).permute(0, 2, 1, 3).reshape(self.s, self.s, 16)
        return d

    def _swap_round(self, stats: SearchStats) -> bool:
        d = self._swap_gains()
        best, arg = d.max(-1)
        best = torch.triu(best, diagonal=1)  # pairs s < t; same-group and repeated pairs drop out as 0
        n_cand = min(int((best > 0).sum()), 4 * self.s)
        if n_cand == 0:
            return False
        flat = torch.topk(best.flatten(), n_cand).indices
        cand_s, cand_t = flat // self.s, flat % self.s
        picked = _disjoint(cand_s.tolist(), cand_t.tolist())
        k = arg[cand_s[picked], cand_t[picked]]
        chosen = torch.stack([4 * cand_s[picked] + k // 4, 4 * cand_t[picked] + k % 4], 1)
        p, q = chosen.t()
        stripes = torch.stack([p // 4, q // 4], 1)  # (n, 2)
        cols = stripes[..., None] * 4 + torch.arange(4, device=p.device)  # (n, 2, 4)
        before = self._stripe_kept(cols).sum(-1)
        trial = self.perm.clone()
        trial[p], trial[q] = self.perm[q], self.perm[p]
        after = group_kept(self.x[:, trial[cols]]).sum(0).sum(-1)
        good = (after - before) > self.tol  # exact check on every row
        if not bool(good.any()):
            return False
        p, q = p[good], q[good]
        self.perm[p], self.perm[q] = self.perm[q].clone(), self.perm[p].clone()
        stats.swaps += int(good.sum())
        self._refresh(torch.unique(stripes[good].flatten()))
        return True

    def _exhaustive_round(self, stats: SearchStats) -> bool:
        rows = self.x.shape[0]
        # The 4*S most promising pairs per round (their best single swap gains most), while the budget lasts.
        n_pairs = min(int(self.budget // (35 * 8 * rows)), self.s * (self.s - 1) // 2, 4 * self.s)
        if n_pairs == 0 or self.s < 2:
            return False
        self.budget -= n_pairs * 35 * 8 * rows
        best = self._swap_gains().amax(-1)
        best = best.masked_fill(~torch.ones_like(best, dtype=torch.bool).triu(1), float("-inf"))
        flat = torch.topk(best.flatten(), n_pairs).indices
        s, t = flat // self.s, flat % self.s
        cols = torch.cat(
            [s[:, None] * 4 + torch.arange(4, device=s.device), t[:, None] * 4 + torch.arange(4, device=s.device)], 1
        )
        gains, choice = [], []
        chunk = max(1, int(2**22 // (35 * 8 * rows)))
        for i in range(0, n_pairs, chunk):
            c8 = cols[i : i + chunk]  # (n, 8) positions
            vals = self.x[:, self.perm[c8]]  # (rows, n, 8)
            split = vals[:, :, self.partitions]  # (rows, n, 35, 8)
            kept = group_kept(split.reshape(*split.shape[:3], 2, 4)).sum(-1).sum(0)  # (n, 35)
            g, k = (kept - kept[:, :1]).max(-1)
            gains.append(g)
            choice.append(k)
        gain, pick = torch.cat(gains), torch.cat(choice)
        good = (gain > self.tol).nonzero().flatten()
        order = good[torch.argsort(gain[good], descending=True, stable=True)]
        chosen = _disjoint(s[order].tolist(), t[order].tolist())
        if not chosen:
            return False
        idx = order[chosen]
        c8 = cols[idx]  # (n, 8) positions of the chosen pairs of groups
        new_perm = self.perm.clone()
        new_perm[c8] = self.perm[torch.gather(c8, 1, self.partitions[pick[idx]])]
        self.perm = new_perm
        stats.exhaustive += len(chosen)
        self._refresh(torch.unique(torch.cat([s[idx], t[idx]])))
        return True

    def perturb(self, gen: torch.Generator) -> None:
        s, t = torch.randperm(self.s, generator=gen)[:2].tolist()
        i, j = torch.randint(0, 4, (2,), generator=gen).tolist()
        p, q = 4 * s + i, 4 * t + j
        self.perm[p], self.perm[q] = self.perm[q].clone(), self.perm[p].clone()
        self._refresh(torch.tensor(sorted((s, t)), device=self.x.device))
