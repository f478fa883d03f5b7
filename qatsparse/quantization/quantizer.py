"""TensorQuantizer: TensorRT-style fake quantization of one tensor (INT8 or FP16)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from qatsparse.quantization.calibrators import CALIBRATORS, make_calibrator
from qatsparse.quantization.fakequant import fake_quantize_int8


def fake_cast_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to half precision and back (what an FP16 engine sees; values beyond 65504 become inf).

    The gradient passes straight through (``Tensor.to`` is differentiable).

    Example:
        >>> fake_cast_fp16(torch.tensor([1.0 + 2**-12, 7e4])).tolist()
        [1.0, inf]
    """
    return x.to(torch.float16).to(x.dtype)


class TensorQuantizer(nn.Module):
    """Fake-quantizes the tensor it is called on, after calibration.

    States: *disabled* (identity), *calibrating* (collects statistics, identity), *quantizing*
    (fake INT8 with the calibrated ``amax``, or FP16 rounding). An INT8 quantizer whose ``amax`` is
    still NaN (never calibrated) is the identity.

    Args:
        precision: ``"int8"`` or ``"fp16"`` (round to half precision and back; no calibration).
        axis: None for per-tensor (activations); the channel axis for per-channel (weights).
        num_channels: size of ``amax`` for per-channel quantizers (so checkpoints load before
            calibration has run).
        narrow_range: clamp to [-127, 127] (TensorRT's weight range).
        calibrator: calibrator name (see :mod:`qatsparse.quantization.calibrators`).
        calibrator_kwargs: extra arguments of the calibrator (e.g. ``percentile``).

    Example:
        >>> q = TensorQuantizer(); q.start_calibration(); _ = q(torch.tensor([0.5, -2.0])); q.finish_calibration()
        >>> float(q.amax), q(torch.tensor([0.005])).item()
        (2.0, 0.0)
    """

    def __init__(
        self,
        precision: Literal["int8", "fp16"] = "int8",
        axis: int | None = None,
        num_channels: int | None = None,
        narrow_range: bool = False,
        calibrator: str = "max",
        calibrator_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if precision not in ("int8", "fp16"):
            raise ValueError(f"precision must be 'int8' or 'fp16', got {precision!r}")
        if calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator must be one of {sorted(CALIBRATORS)}, got {calibrator!r}")
        if axis is not None and num_channels is None:
            raise ValueError("a per-channel quantizer needs num_channels")
        self.precision = precision
        self.axis = axis
        self.narrow_range = narrow_range
        self.calibrator_name = "max" if axis is not None else calibrator
        self.calibrator_kwargs = dict(calibrator_kwargs or {}) if axis is None else {}
        self.enabled = True
        self._calibrator = None
        shape = () if axis is None else (num_channels,)
        self.register_buffer("amax", torch.full(shape, float("nan")))
        # A Python flag, not a check of `amax`, so that the forward never syncs with the GPU.
        self._has_amax = False

    @property
    def calibrated(self) -> bool:
        return self.precision == "fp16" or self._has_amax

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self.load_amax(self.amax.detach().clone())

    @torch.no_grad()
    def load_amax(self, amax: torch.Tensor) -> None:
        """Set ``amax`` (e.g. computed elsewhere); NaN entries mean "not calibrated".

        An amax of 0 (a tensor or channel that was all zeros) becomes 1, as in pytorch-quantization:
        the scale must be positive, and zeros stay zeros.
        """
        amax = amax.reshape(self.amax.shape).to(self.amax)
        self.amax.copy_(torch.where(amax > 0, amax, torch.where(amax.isnan(), amax, torch.ones_like(amax))))
        self._has_amax = bool(torch.isfinite(self.amax).all())

    @property
    def calibrating(self) -> bool:
        return self._calibrator is not None

    def start_calibration(self) -> None:
        if self.precision == "int8":
            self._calibrator = make_calibrator(self.calibrator_name, self.axis, **self.calibrator_kwargs)

    def finish_calibration(self, reduce: bool = True) -> None:
        """Compute ``amax`` from what was collected (reduced across DDP ranks first)."""
        if self._calibrator is None:
            return
        if reduce:
            self._calibrator.reduce()
        self.load_amax(self._calibrator.compute_amax())
        self._calibrator = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calibrator is not None:
            self._calibrator.collect(x)
            return x
        if not self.enabled:
            return x
        if self.precision == "fp16":
            return fake_cast_fp16(x)
        if not self._has_amax:
            return x
        return fake_quantize_int8(x, self.amax, self.axis, self.narrow_range)

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"{self.precision}, {kind}, calibrator={self.calibrator_name}, enabled={self.enabled}"
