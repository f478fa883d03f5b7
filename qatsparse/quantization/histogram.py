"""Histograms of ``|x|`` and the three histogram rules that turn one into an ``amax``.

Pure functions over NumPy arrays, written to match NVIDIA pytorch-quantization's calibrators
(``_compute_amax_entropy``/``_percentile``/``_mse``; see docs/quantization.md): ``hist[i]`` counts the
values in ``[edges[i], edges[i + 1])``, ``edges`` are equally spaced from 0. They are written here
(not imported) because pytorch-quantization is not maintained any more and ModelOpt's copies of them
crash when driven through ``mtq.quantize``; ``tests/test_quant_calibrators.py`` checks them against
a literal transcription of the reference definitions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Number of bins of a new histogram (pytorch-quantization's default).
NUM_BINS = 2048
#: First candidate clip bin of the entropy and mse searches (pytorch-quantization's default).
START_BIN = 128
#: Elements binned at once: float32 counts are exact up to 2**24.
_CHUNK = 1 << 24


def bin_edges(width: float, num_bins: int) -> np.ndarray:
    """Edges ``0, width, 2 * width, ...`` of a histogram of ``num_bins`` bins.

    Example:
        >>> bin_edges(0.5, 4).tolist()
        [0.0, 0.5, 1.0, 1.5, 2.0]
    """
    return width * np.arange(num_bins + 1, dtype=np.float64)


@torch.no_grad()
def bin_counts(a: torch.Tensor, width: float, num_bins: int) -> torch.Tensor:
    """Exact counts (float64, on ``a``'s device) of the non-negative values ``a`` in bins of ``width``.

    Bin ``i`` holds ``[i * width, (i + 1) * width)``; the last bin also holds everything beyond.
    ``torch.histc`` counts in float32, exact only up to 2**24 per bin, so the values are binned in
    chunks of at most 2**24 elements and the counts summed in float64 (post-ReLU activations put more
    zeros than that into bin 0). Where deterministic algorithms are required on CUDA (histc has no
    deterministic CUDA kernel) the bins come from ``bincount`` instead (slower, same counts).

    Example:
        >>> bin_counts(torch.tensor([0.0, 0.4, 0.5, 9.0]), 0.5, 3).tolist()
        [2.0, 1.0, 1.0]
    """
    flat = a.reshape(-1).float()
    top = width * num_bins
    out = torch.zeros(num_bins, dtype=torch.float64, device=a.device)
    use_bincount = flat.is_cuda and torch.are_deterministic_algorithms_enabled()
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].clamp(max=top)  # histc drops values beyond its range
        if use_bincount:
            idx = torch.div(chunk, width).floor_().clamp_(0, num_bins - 1).long()
            out += torch.bincount(idx, minlength=num_bins).to(torch.float64)
        else:
            out += torch.histc(chunk, bins=num_bins, min=0.0, max=top).to(torch.float64)
    return out


def entropy_amax(
    hist: np.ndarray, edges: np.ndarray, num_bits: int = 8, unsigned: bool = False, start_bin: int = START_BIN
) -> float:
    """KL-divergence (entropy) calibration: the clip edge whose 128-level quantized histogram is closest.

    For every candidate ``i`` from ``start_bin`` to ``len(hist)``: P is ``hist[:i]`` with the mass of
    ``hist[i:]`` added to its last bin; Q merges ``hist[:i]`` into ``2 ** (num_bits - 1)`` equal-width
    buckets (``np.digitize`` over ``np.linspace(0, i, 129)``) and spreads each bucket's total evenly
    over its non-zero bins. The last ``i`` with the smallest KL(P || Q) wins; ``bins[0]`` is replaced
    by ``bins[1]`` first (zeros from ReLU would dominate otherwise). Returns ``edges[i]``.

    All candidates are scored at once from prefix sums (the reference loops over candidates, ~100x
    slower), using KL = (sum p log p - sum p log q) / sum(P) + log(sum(Q) / sum(P)), where within
    a bucket ``sum p log q = bucket total * log(bucket mean)``.

    Example:
        >>> h = np.ones(2048); h[-1] = 0; h[-2] = 1e-3
        >>> 1500 < entropy_amax(h, bin_edges(1.0, 2048)) <= 2048
        True
    """
    b = np.array(hist, dtype=np.float64)
    n = len(b)
    if n < start_bin:
        raise ValueError(f"entropy calibration needs at least {start_bin} bins, got {n}")
    b[0] = b[1]
    levels = 1 << (num_bits - 1 + int(unsigned))
    with np.errstate(divide="ignore", invalid="ignore"):
        blogb = np.where(b > 0, b * np.log(np.where(b > 0, b, 1.0)), 0.0)
    c = np.concatenate([[0.0], np.cumsum(b)])  # c[j] = b[:j].sum()
    nz = np.concatenate([[0], np.cumsum(b != 0)])  # non-zero bins among b[:j]
    lg = np.concatenate([[0.0], np.cumsum(blogb)])
    total = c[-1]
    cand = np.arange(start_bin, n + 1)
    # Bucket k of candidate i holds the bins j with k * i / levels <= j < (k + 1) * i / levels
    # (i / levels is exact in binary floating point for levels a power of two, as np.linspace computes it).
    starts = -((-np.arange(levels + 1)[None, :] * cand[:, None]) // levels)  # ceil(k * i / levels)
    tot = c[starts[:, 1:]] - c[starts[:, :-1]]
    cnt = nz[starts[:, 1:]] - nz[starts[:, :-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0)
        sum_p_log_q = np.sum(np.where(cnt > 0, tot * np.log(np.where(mean > 0, mean, 1.0)), 0.0), axis=1)
    tail = total - c[cand]  # mass beyond the clip, added to the last bin of P
    last = b[cand - 1]
    p_last = last + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        sum_p_log_p = lg[cand - 1] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
        q_last = mean[:, -1]  # bin i - 1 is always in the last bucket
        sum_p_log_q = sum_p_log_q + np.where(tail > 0, tail * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
        kl = (sum_p_log_p - sum_p_log_q) / total + np.log(c[cand] / total)
    kl[(tail > 0) & (last == 0)] = np.inf  # P > 0 where Q = 0
    kl[c[cand] == 0] = np.nan
    finite = ~np.isnan(kl)
    if not finite.any():
        return float(edges[n])
    best = np.nanmin(kl)
    i = int(cand[np.nonzero(kl == best)[0][-1]])  # the last index of the minimum, as the reference
    return float(edges[i])


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) of two unnormalised histograms, as ``scipy.stats.entropy(p, q)`` computes it.

    ``inf`` where Q is 0 and P is not; scipy is only a test dependency, hence this copy.

    Example:
        >>> round(kl_divergence(np.array([1.0, 1.0]), np.array([1.0, 3.0])), 4)
        0.1438
    """
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    if np.any(q[mask] <= 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def percentile_amax(hist: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """Percentile calibration: the left edge of the bin where the CDF reaches ``percentile`` %.

    Example:
        >>> h = np.histogram(np.arange(100.0), bins=2048, range=(0, 99))[0]
        >>> round(percentile_amax(h, np.linspace(0, 99, 2049), 90), 1)
        89.0
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    hist = np.asarray(hist, dtype=np.float64)
    cdf = np.cumsum(hist) / hist.sum()
    idx = int(np.searchsorted(cdf, percentile / 100.0))
    return float(edges[min(idx, len(edges) - 1)])


def mse_amax(
    hist: np.ndarray, edges: np.ndarray, num_bits: int = 8, unsigned: bool = False, start_bin: int = START_BIN
) -> float:
    """MSE calibration: the bin centre that, used as amax, minimises the quantization error of the data.

    Every bin centre ``c[i]`` (``i >= start_bin``) is tried as amax: the centres are fake-quantized
    (symmetric, narrow range, round half to even) and scored with ``mean(hist * (q - c) ** 2)``; the
    first minimum wins.

    Example:
        >>> h = np.zeros(2048); h[2040] = 1000; h[2047] = 1
        >>> e = bin_edges(256 / 2048, 2048); abs(mse_amax(h, e) - 255) < abs(mse_amax(h, e) - 256)
        True
    """
    counts = np.asarray(hist, dtype=np.float64)
    centres = (edges[1:] + edges[:-1]) / 2
    if len(centres) <= start_bin:
        raise ValueError(f"mse calibration needs more than {start_bin} bins, got {len(centres)}")
    max_bound = (1 << (num_bits - 1 + int(unsigned))) - 1
    min_bound = 0 if unsigned else -max_bound
    best_i, best = start_bin, math.inf
    for lo in range(start_bin, len(centres), 256):  # 256 candidates at a time bounds the memory
        amax = centres[lo : lo + 256, None]
        scale = max_bound / amax
        q = np.clip(np.round(centres[None, :] * scale), min_bound, max_bound) / scale
        mse = np.mean(counts[None, :] * (q - centres[None, :]) ** 2, axis=1)
        j = int(np.argmin(mse))
        if mse[j] < best:
            best_i, best = lo + j, float(mse[j])
    return float(centres[best_i])
