"""Calibrators against an independent reference (a literal transcription of the definitions in
notes/calibration.md, i.e. NVIDIA pytorch-quantization's loops, with scipy's KL divergence) and the
reference cases of that project."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from qatsparse.quantization import (
    HistogramCalibrator,
    MaxCalibrator,
    QuantConfig,
    calibrate,
    entropy_amax,
    make_calibrator,
    mse_amax,
    percentile_amax,
    quantize_model,
    quantizers,
)
from qatsparse.quantization.calibrators import rebin

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is the independent KL reference")


# ----------------------------------------------------------------------------- reference
def ref_histogram(batches: list[torch.Tensor], num_bins: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-quantization's HistogramCalibrator.collect (torch_hist=True), transcribed."""
    hist = edges = None
    for x in batches:
        x = x.abs().float()
        x_max = x.max()
        if edges is None:
            hist = torch.histc(x, bins=num_bins, min=0, max=float(x_max)).double()
            edges = torch.linspace(0, float(x_max), num_bins + 1, dtype=torch.float64)
        else:
            if x_max > edges[-1]:
                width = edges[1] - edges[0]
                num_bins = int((x_max / width).ceil().item())
                edges = width * torch.arange(num_bins + 1, dtype=torch.float64)
            h = torch.histc(x, bins=num_bins, min=0, max=float(edges[-1])).double()
            h[: hist.numel()] += hist
            hist = h
    return hist.numpy(), edges.numpy()


def ref_entropy(hist: np.ndarray, edges: np.ndarray, num_bits: int = 8, start_bin: int = 128) -> float:
    bins = hist.copy()
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1)
    divergences = []
    for i in range(start_bin, len(bins) + 1):
        new_density_counts = np.zeros(nbins)
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        for idx, d in enumerate(digitized):
            if d != -1:
                new_density_counts[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                new_density_counts[key] /= val
        new_density = np.zeros(i)
        for idx, d in enumerate(digitized):
            if d != -1:
                new_density[idx] = new_density_counts[d]
        reference = np.array(bins[:i])
        reference[-1] += bins[i:].sum()
        divergences.append(scipy_stats.entropy(reference, new_density))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return float(edges[last_argmin + start_bin])


def ref_percentile(hist: np.ndarray, edges: np.ndarray, p: float) -> float:
    cdf = np.cumsum(hist) / hist.sum()
    return float(edges[np.searchsorted(cdf, p / 100)])


def ref_mse(hist: np.ndarray, edges: np.ndarray, start_bin: int = 128) -> float:
    # float32 as the reference (torch there, NumPy here: same IEEE arithmetic, round half to even)
    counts = hist.astype(np.float32)
    e = edges.astype(np.float32)
    centres = (e[1:] + e[:-1]) / np.float32(2)
    mses = []
    for i in range(start_bin, len(centres)):
        amax = centres[i]
        scale = np.float32(127.0) / amax
        q = np.clip(np.round(centres * scale), -127, 127) / scale
        mses.append(float(((q - centres) ** 2 * counts).mean()))
    return float(centres[start_bin + int(np.argmin(mses))])


# ----------------------------------------------------------------------------- data
def _data(seed: int) -> list[torch.Tensor]:
    """ReLU-like activations: many zeros, a half-normal body, a sparse long tail."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        x = torch.randn(4096, generator=g).relu()
        x[torch.randint(0, 4096, (8,), generator=g)] *= 6
        out.append(x)
    return out


@pytest.fixture(scope="module")
def histograms() -> list[tuple[np.ndarray, np.ndarray]]:
    # the default 2048 bins; 512 bins (the reference loops are slow); a sparse one with many empty bins
    sparse = [torch.randn(300, generator=torch.Generator().manual_seed(4)) ** 3]
    return [ref_histogram(_data(0)), ref_histogram(_data(1), num_bins=512), ref_histogram(sparse, num_bins=512)]


# ----------------------------------------------------------------------------- the pure rules
def _one_bin(edges: np.ndarray) -> float:
    return float(edges[1] - edges[0])


def test_entropy_matches_reference(histograms):
    for hist, edges in histograms:
        assert entropy_amax(hist, edges) == pytest.approx(ref_entropy(hist, edges), abs=1e-9)


@pytest.mark.parametrize("p", [90.0, 99.0, 99.9, 99.99, 100.0])
def test_percentile_matches_reference(histograms, p):
    for hist, edges in histograms:
        assert percentile_amax(hist, edges, p) == ref_percentile(hist, edges, p)


def test_mse_matches_reference(histograms):
    # The reference scores in float32, we score in float64: a near-tie may pick a neighbouring bin.
    for hist, edges in histograms:
        assert mse_amax(hist, edges) == pytest.approx(ref_mse(hist, edges), abs=_one_bin(edges))


def test_streaming_histogram_matches_reference():
    batches = _data(3)
    batches[1] = batches[1] * 1.7  # second batch extends the range
    c = HistogramCalibrator("entropy")
    for x in batches:
        c.collect(x)
    hist, edges = c.histogram()
    ref_hist, ref_edges = ref_histogram(batches)
    assert len(hist) == len(ref_hist) > 2048
    np.testing.assert_allclose(edges, ref_edges, rtol=1e-12)
    assert hist.sum() == ref_hist.sum() == 3 * 4096
    # bincount (ours) and histc may put a value lying on a bin edge into neighbouring bins
    assert np.abs(hist - ref_hist).sum() <= 4


# ----------------------------------------------------------------------------- reference cases
def _calibrated_amax(name: str, batches: list[torch.Tensor], **kw) -> float:
    c = make_calibrator(name, **kw)
    for x in batches:
        c.collect(x)
    return float(c.compute_amax())


def test_uniform_plus_outlier_clipped_by_histogram_methods_not_by_max():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100_000, generator=g)
    x[123] = 10.0
    assert _calibrated_amax("max", [x]) == 10.0
    for name in ("entropy", "percentile"):
        amax = _calibrated_amax(name, [x])
        assert 0.9 < amax < 1.1, (name, amax)
    # mse clips the outlier too, but not down to the body: the outlier's own squared error
    # (10 - amax)**2 is part of the objective (about 6.6 here, as the reference computes).
    hist, edges = ref_histogram([x])
    amax = _calibrated_amax("mse", [x])
    assert 1.0 < amax < 8.0
    assert amax == pytest.approx(ref_mse(hist, edges), abs=_one_bin(edges))
    # with 100 times less weight on the outlier, mse clips it to the body as well
    y = torch.cat([x[:123], x[124:]]).repeat(100)
    y[0] = 10.0
    assert 0.9 < _calibrated_amax("mse", [y]) < 1.1


def test_max_is_exact_per_tensor_and_per_axis():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, 3, 4, generator=g) for _ in range(3)]
    full = torch.cat(xs)
    assert _calibrated_amax("max", xs) == float(full.abs().max())
    c = MaxCalibrator(axis=1)
    for x in xs:
        c.collect(x)
    assert torch.equal(c.compute_amax(), full.abs().amax(dim=(0, 2)))
    c = MaxCalibrator(axis=-1)
    for x in xs:
        c.collect(x)
    assert torch.equal(c.compute_amax(), full.abs().amax(dim=(0, 1)))


def test_mse_255s_and_one_256_closer_to_255():
    x = torch.full((1000,), 255.0)
    x[0] = 256.0
    amax = _calibrated_amax("mse", [x])
    assert abs(amax - 255) < abs(amax - 256)


@pytest.mark.parametrize(("p", "expected"), [(90.0, 89.0), (80.0, 79.0), (99.0, 97.0)])
def test_percentile_arange(p, expected):
    amax = _calibrated_amax("percentile", [torch.arange(100.0)], percentile=p)
    assert amax == pytest.approx(expected, abs=1.0)


def test_histogram_of_zeros_only_gives_zero():
    assert _calibrated_amax("entropy", [torch.zeros(10), torch.zeros(3)]) == 0.0


def test_rebin_keeps_mass_and_spreads_uniformly():
    h = np.array([4.0, 0.0, 2.0])
    out = rebin(h, 1.0, 2.0, 2)
    assert out.sum() == h.sum()
    np.testing.assert_allclose(out, [4.0, 2.0])
    np.testing.assert_allclose(rebin(np.array([3.0]), 1.0, 0.5, 2), [1.5, 1.5])


# ----------------------------------------------------------------------------- batch-size independence
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)
    )


@pytest.mark.parametrize("calibrator", ["max", "entropy", "percentile", "mse"])
def test_batch_size_independence(calibrator):
    """Batch 1 and batch 64 over the same 64 samples.

    Tolerance: calibrate() histograms over [0, global max] (first pass), so the histogram of a given
    set of values does not depend on how they are batched. The only difference left is the conv
    arithmetic (batch 1 and batch 64 may use different kernels, changing activations by ~1 ulp), which
    can move a value to the neighbouring bin: amax may differ by at most one bin (max/2048).
    """
    data = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    amaxes = []
    for bs in (1, 64):
        m = _model()
        quantize_model(m, QuantConfig(calibrator=calibrator))
        calibrate(m, list(data.split(bs)), m)
        amaxes.append({n: q.amax.clone() for n, q in quantizers(m).items()})
    for name, a in amaxes[0].items():
        b = amaxes[1][name]
        if "weight" in name or calibrator == "max":
            assert torch.allclose(a, b, rtol=1e-6, atol=0), name
        else:
            assert abs(float(a) - float(b)) <= float(amaxes[0][name]) / 2048 * 1.01 + 1e-6, (name, a, b)


def test_calibrator_level_batching_is_exact():
    """On a raw tensor stream (no model arithmetic) the amax is bit-identical for batch 1 and 64."""
    x = torch.cat(_data(5))[:4096]
    for name in ("entropy", "percentile", "mse"):
        out = []
        for bs in (1, 64):
            c = make_calibrator(name)
            c.begin_range_pass()
            for b in x.split(bs):
                c.collect(b)
            c.end_range_pass()
            for b in x.split(bs):
                c.collect(b)
            out.append(float(c.compute_amax()))
        assert out[0] == out[1], name


def test_pytorch_quantization_streaming_range_depends_on_first_batch():
    """Why calibrate() runs a first pass: with the reference's streaming histogram, batch 1 and
    batch 64 give different bin widths and (here) different amax (batch 16 here: batch 1 makes
    millions of bins when the first value is small)."""
    x = torch.cat(_data(7))[:1024]
    out, widths = [], []
    for bs in (16, 64):
        c = make_calibrator("entropy")
        for b in x.split(bs):
            c.collect(b)
        out.append(float(c.compute_amax()))
        widths.append(c.width)
    assert widths[0] != widths[1]
    assert out[0] != out[1]


def test_calibrate_accepts_generators_and_factories_and_replays_shuffled_loaders():
    import itertools

    from torch.utils.data import DataLoader, TensorDataset

    data = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    loader = DataLoader(TensorDataset(data), batch_size=16, shuffle=True)
    torch.manual_seed(5)
    first_two = [b[0] for b in itertools.islice(loader, 2)]  # what a shuffled loader yields first
    results = []
    for make in (
        lambda: first_two,
        lambda: iter(first_two),  # one-shot iterator: kept in memory for the second pass
        lambda: lambda: (b[0] for b in itertools.islice(loader, 2)),  # factory: the RNG is replayed
    ):
        m = _model()
        quantize_model(m, QuantConfig(calibrator="entropy"))
        torch.manual_seed(5)
        assert calibrate(m, make(), m) == 2
        results.append({k: q.amax.clone() for k, q in quantizers(m).items()})
    for r in results[1:]:
        for k in r:
            assert torch.equal(r[k], results[0][k]), k
