"""Calibrators: statistics of a tensor stream -> the clipping range ``amax`` of a quantizer."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class MaxCalibrator:
    """Running maximum of ``|x|``, per tensor (``axis=None``) or per channel along ``axis``.

    Exact: the amax is the largest magnitude seen, independent of how the stream is batched.

    Example:
        >>> c = MaxCalibrator(); c.collect(torch.tensor([1.0, -3.0])); c.collect(torch.tensor([2.0]))
        >>> float(c.compute_amax())
        3.0
    """

    name = "max"

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.amax: torch.Tensor | None = None

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float()
        if self.axis is None:
            cur = a.amax()
        else:
            dims = [d for d in range(a.dim()) if d != self.axis % a.dim()]
            cur = a.amax(dim=dims) if dims else a
        self.amax = cur if self.amax is None else torch.maximum(self.amax, cur)

    def reduce(self) -> None:
        """Make every rank hold the maximum over all ranks' statistics."""
        if _dist_ready() and self.amax is not None:
            dist.all_reduce(self.amax, op=dist.ReduceOp.MAX)

    def compute_amax(self) -> torch.Tensor:
        if self.amax is None:
            raise RuntimeError("calibrator saw no data: did the calibration batches reach this layer?")
        return self.amax.clone()


#: Calibrator classes by name; histogram calibrators register here too.
CALIBRATORS: dict[str, type] = {"max": MaxCalibrator}


def make_calibrator(name: str, axis: int | None = None, **kwargs: float) -> MaxCalibrator:
    """Create the calibrator called ``name`` (one of :data:`CALIBRATORS`)."""
    try:
        cls = CALIBRATORS[name]
    except KeyError:
        raise ValueError(f"unknown calibrator {name!r}; valid: {sorted(CALIBRATORS)}") from None
    return cls(axis=axis, **kwargs)
