"""Calibrators: statistics of a tensor stream -> the clipping range ``amax`` of a quantizer.

Every calibrator has ``collect(x)`` (called by the quantizer on each tensor it sees), ``reduce()``
(make the statistics of all DDP ranks identical on every rank) and ``compute_amax()``. Histogram
calibrators also take part in :func:`~qatsparse.quantization.calibrate`'s first pass, which finds
the global ``max |x|`` so that the histogram of the second pass spans the whole range with 2048
bins on every rank, whatever the batch size (``needs_range_pass``/``end_range_pass``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from qatsparse.quantization.histogram import (
    NUM_BINS,
    START_BIN,
    bin_counts,
    bin_edges,
    entropy_amax,
    mse_amax,
    percentile_amax,
)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class MaxCalibrator:
    """Running maximum of ``|x|``, per tensor (``axis=None``) or per channel along ``axis``.

    Exact: the amax is the largest magnitude seen, independent of how the stream is batched.

    Example:
        >>> c = MaxCalibrator(); c.collect(torch.tensor([1.0, -3.0])); c.collect(torch.tensor([2.0]))
        >>> float(c.compute_amax())
        3.0
    """

    name = "max"
    needs_range_pass = False

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.amax: torch.Tensor | None = None
        self._frozen = False

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        if self._frozen:
            return
        a = x.detach().abs().float()
        if self.axis is None:
            cur = a.amax()
        else:
            dims = [d for d in range(a.dim()) if d != self.axis % a.dim()]
            cur = a.amax(dim=dims) if dims else a
        self.amax = cur if self.amax is None else torch.maximum(self.amax, cur)

    def end_range_pass(self) -> None:
        """The max is known after one pass: ignore the data of a second pass."""
        self._frozen = True

    def reduce(self) -> None:
        """Make every rank hold the maximum over all ranks' statistics."""
        if not _dist_ready():
            return
        if self.amax is None and self.axis is None:  # this rank never ran the layer
            self.amax = torch.zeros((), device=_collective_device())
        if self.amax is None:
            raise RuntimeError("per-channel max calibration saw no data on this rank")
        dist.all_reduce(self.amax, op=dist.ReduceOp.MAX)

    def compute_amax(self) -> torch.Tensor:
        if self.amax is None:
            raise RuntimeError("calibrator saw no data: did the calibration batches reach this layer?")
        return self.amax.clone()


class HistogramCalibrator:
    """Histogram of ``|x|`` (2048 bins) and one of the rules ``entropy``, ``percentile`` or ``mse``.

    Two ways of choosing the bins:

    * after :meth:`end_range_pass` (what :func:`~qatsparse.quantization.calibrate` does): the bins
      span ``[0, global max |x|]`` found by a first pass over the same batches (reduced across DDP
      ranks). The histogram is then independent of the batch size and identical to the one a single
      process would build from all ranks' data.
    * streaming (pytorch-quantization's behaviour, used when ``collect`` is called without a first
      pass): the first batch sets ``[0, max]``; a later batch beyond the last edge extends the range
      with the same bin width.

    Args:
        method: ``"entropy"``, ``"percentile"`` or ``"mse"``.
        axis: must be None (histogram calibration is per tensor).
        percentile: for ``method="percentile"``, in (0, 100].
        num_bins: bins of a new histogram.
        start_bin: first candidate bin of the entropy/mse searches.

    Example:
        >>> c = HistogramCalibrator("percentile", percentile=90.0)
        >>> c.collect(torch.arange(100.0)); round(float(c.compute_amax()))
        89
    """

    needs_range_pass = True

    def __init__(
        self,
        method: str,
        axis: int | None = None,
        percentile: float = 99.99,
        num_bins: int = NUM_BINS,
        start_bin: int = START_BIN,
    ) -> None:
        if method not in ("entropy", "percentile", "mse"):
            raise ValueError(f"histogram method must be one of ['entropy', 'mse', 'percentile'], got {method!r}")
        if axis is not None:
            raise ValueError(f"histogram calibration is per tensor; got axis={axis} (use 'max' per channel)")
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.name = method
        self.axis = None
        self.percentile = float(percentile)
        self.num_bins = int(num_bins)
        self.start_bin = int(start_bin)
        self.hist: torch.Tensor | None = None
        self.width: float | None = None
        self.zeros = 0  # values seen while every value so far was 0 (no width yet)
        self.range_max: torch.Tensor | None = None  # first pass
        self.mode = "stream"  # "range" during calibrate()'s first pass, "fixed" after it

    # --------------------------------------------------------------- collection
    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        a = x.detach().abs()
        if self.mode == "range":
            m = a.amax().float()
            self.range_max = m if self.range_max is None else torch.maximum(self.range_max, m)
            return
        self._add(a)

    def begin_range_pass(self) -> None:
        """Collect only ``max |x|`` until :meth:`end_range_pass` (called by ``calibrate``)."""
        self.mode = "range"

    def end_range_pass(self) -> None:
        """Fix the bins to ``[0, max |x|]`` of the first pass (max over all DDP ranks)."""
        if self.mode != "range":
            return
        m = self.range_max
        if _dist_ready():
            m = torch.zeros((), device=_collective_device()) if m is None else m
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
        top = 0.0 if m is None else float(m)
        self.width = top / self.num_bins if top > 0 else None
        if self.width is not None:
            self.hist = torch.zeros(self.num_bins, dtype=torch.float64, device=m.device)
        self.mode = "fixed"

    def _add(self, a: torch.Tensor) -> None:
        top = float(a.amax()) if a.numel() else 0.0
        if self.width is None:
            if top == 0.0:
                self.zeros += a.numel()
                return
            self.width = top / self.num_bins
            self.hist = torch.zeros(self.num_bins, dtype=torch.float64, device=a.device)
        assert self.hist is not None
        n = len(self.hist)
        if top > n * self.width:  # extend the range with the same bin width
            n = math.ceil(top / self.width)
            self.hist = torch.cat([self.hist, self.hist.new_zeros(n - len(self.hist))])
        self.hist += bin_counts(a, self.width, n).to(self.hist.device)

    # --------------------------------------------------------------- DDP
    def reduce(self) -> None:
        """Sum the histograms of all DDP ranks on every rank, on a common grid of bins.

        Ranks whose bins have the same width (always the case after ``end_range_pass``) are summed
        exactly. In streaming mode the widths differ: every rank then re-bins its histogram onto the
        widest width (counts spread uniformly inside a bin) before the sum -- an approximation.
        """
        if not _dist_ready():
            return
        dev = _collective_device()
        local = torch.tensor(
            [self.width or 0.0, 0 if self.hist is None else len(self.hist), float(self.zeros)],
            dtype=torch.float64,
            device=dev,
        )
        every = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(every, local)
        widths = [float(t[0]) for t in every if float(t[0]) > 0]
        zeros = sum(int(t[2]) for t in every)
        if not widths:  # only zeros anywhere
            self.zeros, self.hist, self.width = zeros, None, None
            return
        width = max(widths)
        top = max(float(t[0]) * float(t[1]) for t in every)
        n = max(1, math.ceil(top / width - 1e-9))
        mine = np.zeros(n) if self.hist is None else self.hist.double().cpu().numpy()
        if self.width is not None and self.width != width:
            mine = rebin(mine, self.width, width, n)
        mine = np.concatenate([mine, np.zeros(n - len(mine))])
        mine[0] += self.zeros
        total = torch.from_numpy(mine).to(dev)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        self.hist, self.width, self.zeros = total, width, 0  # the zeros are in bin 0 now

    # --------------------------------------------------------------- result
    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` of what was collected (float64 NumPy arrays)."""
        if self.hist is None or self.width is None:
            raise RuntimeError("calibrator saw no non-zero data")
        counts = self.hist.double().cpu().numpy().copy()
        counts[0] += self.zeros
        return counts, bin_edges(self.width, len(counts))

    def compute_amax(self) -> torch.Tensor:
        if self.hist is None and self.zeros == 0 and self.range_max is None:
            raise RuntimeError("calibrator saw no data: did the calibration batches reach this layer?")
        if self.hist is None:  # everything was 0
            return torch.tensor(0.0)
        counts, edges = self.histogram()
        if self.name == "entropy":
            amax = entropy_amax(counts, edges, start_bin=self.start_bin)
        elif self.name == "percentile":
            amax = percentile_amax(counts, edges, self.percentile)
        else:
            amax = mse_amax(counts, edges, start_bin=self.start_bin)
        return torch.tensor(amax, dtype=torch.float32)


def rebin(hist: np.ndarray, width: float, new_width: float, new_bins: int) -> np.ndarray:
    """Re-bin ``hist`` (bins of ``width``) onto ``new_bins`` bins of ``new_width``, spreading each bin's
    count uniformly over its interval (linear interpolation of the cumulative counts).

    Example:
        >>> rebin(np.array([2.0, 2.0]), 1.0, 2.0, 1).tolist()
        [4.0]
    """
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    x = width * np.arange(len(hist) + 1)
    return np.diff(np.interp(new_width * np.arange(new_bins + 1), x, cum))


def _histogram_factory(method: str):
    def make(axis: int | None = None, **kwargs: float) -> HistogramCalibrator:
        return HistogramCalibrator(method, axis=axis, **kwargs)

    make.__name__ = f"{method}_calibrator"
    return make


#: Calibrator factories by name: ``CALIBRATORS[name](axis=None, **kwargs)``.
CALIBRATORS: dict[str, type | object] = {
    "max": MaxCalibrator,
    "entropy": _histogram_factory("entropy"),
    "percentile": _histogram_factory("percentile"),
    "mse": _histogram_factory("mse"),
}

Calibrator = MaxCalibrator | HistogramCalibrator


def make_calibrator(name: str, axis: int | None = None, **kwargs: float) -> Calibrator:
    """Create the calibrator called ``name`` (one of :data:`CALIBRATORS`).

    Example:
        >>> make_calibrator("entropy").name
        'entropy'
    """
    try:
        factory = CALIBRATORS[name]
    except KeyError:
        raise ValueError(f"unknown calibrator {name!r}; valid: {sorted(CALIBRATORS)}") from None
    if name != "percentile":
        kwargs.pop("percentile", None)
    return factory(axis=axis, **kwargs)  # type: ignore[operator]
