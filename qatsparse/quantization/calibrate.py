"""Run calibration batches through a model whose quantizers collect statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from qatsparse.quantization.modules import quantizers

Batches = Iterable[Any] | Callable[[], Iterable[Any]]


@contextlib.contextmanager
def _replayable_rng(devices: list[int]) -> Iterator[Callable[[], None]]:
    """Fork the RNG; the yielded function resets it to the state at entry (so that a shuffling
    dataloader iterated twice yields the same batches twice)."""
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]

        def reset() -> None:
            torch.set_rng_state(cpu)
            for d, s in zip(devices, cuda):
                torch.cuda.set_rng_state(s, d)

        yield reset


@torch.no_grad()
def calibrate(model: nn.Module, batches: Batches, forward: Callable[[Any], Any]) -> int:
    """Calibrate every INT8 quantizer of ``model``: ``forward(batch)`` for each batch, then set ``amax``.

    All quantizers pass their input through unchanged while calibrating (as in pytorch-quantization:
    each layer's statistics are those of the float model). Runs in eval mode (BatchNorm uses its
    running statistics, as at deployment) and restores the previous mode.

    When a histogram calibrator (entropy, percentile, mse) is present the batches are run twice:
    the first pass finds ``max |x|`` of each quantizer, so that the histograms of the second pass
    span the whole range with the same 2048 bins whatever the batch size and on every DDP rank
    (pytorch-quantization instead sets the range from the first batch; docs/quantization.md says
    why we don't). ``batches`` may be a re-iterable (list, DataLoader), a function returning a fresh
    iterable, or a one-shot iterator (then kept in memory for the second pass). The RNG is reset
    before the second pass, so a shuffling DataLoader replays the same batches, and is restored at
    the end (training randomness is untouched).

    Under DDP each quantizer's statistics are reduced across ranks (max for max, summed histograms
    for the others), so every rank ends with the same ``amax``. Returns the number of batches seen
    in one pass.

    Example:
        >>> from qatsparse.quantization import QuantConfig, quantize_model
        >>> m = nn.Sequential(nn.Linear(4, 4)); _ = quantize_model(m, QuantConfig())
        >>> calibrate(m, [torch.randn(8, 4)], m)
        1
    """
    qs = [q for q in quantizers(model).values() if q.precision == "int8"]
    for q in qs:
        q.start_calibration()
    cals = [q._calibrator for q in qs if q._calibrator is not None]
    two_pass = any(c.needs_range_pass for c in cals)
    if two_pass and isinstance(batches, Iterator):  # one-shot: keep it for the second pass
        batches = list(batches)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    was_training = model.training
    model.eval()
    try:
        with _replayable_rng(cuda) as reset_rng:
            if two_pass:
                for c in cals:
                    if c.needs_range_pass:
                        c.begin_range_pass()
            n = _run(batches, forward)
            if n == 0:
                raise RuntimeError("calibration got no batches")
            if two_pass:
                for c in cals:
                    c.end_range_pass()
                reset_rng()
                _run(batches, forward)
    except BaseException:
        for q in qs:
            q._calibrator = None
        raise
    finally:
        model.train(was_training)
    for q in qs:
        q.finish_calibration()
    return n


def _run(batches: Batches, forward: Callable[[Any], Any]) -> int:
    n = 0
    for batch in batches() if callable(batches) else batches:
        forward(batch)
        n += 1
    return n
