"""Plain configuration of quantization-aware training (validated at construction)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PRECISIONS = ("int8", "fp16")


@dataclass
class QuantConfig:
    """What to quantize and how.

    Args:
        precision: ``"int8"`` (TensorRT explicit quantization: per-channel weights, per-tensor
            activations, symmetric) or ``"fp16"`` (weights and activations rounded to half).
        calibrator: activation calibrator (INT8 only); weights always use per-channel max.
        percentile: percentile of the ``percentile`` calibrator, in (0, 100].
        exclude: regexes of module names kept in higher precision.

    Example:
        >>> QuantConfig(precision="int8", exclude=["fc"]).precision
        'int8'
    """

    precision: Literal["int8", "fp16"] = "int8"
    calibrator: str = "max"
    percentile: float = 99.99
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from qatsparse.quantization.calibrators import CALIBRATORS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator must be one of {sorted(CALIBRATORS)}, got {self.calibrator!r}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        self.exclude = list(self.exclude or [])

    def calibrator_kwargs(self) -> dict[str, float]:
        return {"percentile": float(self.percentile)} if self.calibrator == "percentile" else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
