"""Plain configuration of quantization-aware training (validated at construction)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from qatsparse.patterns import compile_patterns, matches_any

PRECISIONS = ("int8", "fp16")


@dataclass
class QuantConfig:
    """What to quantize and how.

    Args:
        precision: ``"int8"`` (TensorRT explicit quantization: per-channel weights, per-tensor
            activations, symmetric) or ``"fp16"`` (weights and activations rounded to half).
        calibrator: activation calibrator (INT8 only); weights always use per-channel max.
        percentile: percentile of the ``percentile`` calibrator, in (0, 100].
        exclude: patterns of module names kept in higher precision (regexes or globs, see
            :mod:`qatsparse.patterns`).
        higher_precision: exact module names kept in higher precision, with the reason (filled in by
            the QAT callback: layers chosen by ``auto_exclude`` and layers that overflow FP16). Part
            of the config so that a checkpoint restores exactly the same structure.
        residual: INT8 only: quantize the residual input of ``a + b`` after a quantized conv, so
            that TensorRT fuses the add into the conv (see :mod:`qatsparse.quantization.placement`).
        attention_matmuls: INT8 only: also quantize both operands of the two attention matmuls
            (Q·Kᵀ and softmax·V) of ``nn.MultiheadAttention`` (TensorRT's INT8 attention kernels); the
            input and output projections are quantized either way (docs/quantization.md).
        recompute: for a compiled model: let the backward recompute fake-quantized conv/linear inputs
            (cheap pointwise ops) instead of keeping them beside the tensors they come from; less memory,
            some more work in the backward, the same numbers. The QAT callback's ``compile`` reads it; for
            your own compile call, :func:`qatsparse.compiling.compile_module` with ``recompute=True``.
            No effect in eager mode.

    Example:
        >>> QuantConfig(precision="int8", exclude=["fc"]).precision
        'int8'
    """

    precision: Literal["int8", "fp16"] = "int8"
    calibrator: str = "max"
    percentile: float = 99.99
    exclude: list[str] = field(default_factory=list)
    higher_precision: dict[str, str] = field(default_factory=dict)
    residual: bool = True
    attention_matmuls: bool = False
    recompute: bool = True

    def __post_init__(self) -> None:
        from qatsparse.quantization.calibrators import CALIBRATORS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator must be one of {sorted(CALIBRATORS)}, got {self.calibrator!r}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if isinstance(self.exclude, str):
            raise ValueError(f"exclude must be a list of patterns, got the string {self.exclude!r}")
        self.exclude = list(self.exclude or [])
        compile_patterns(self.exclude, "exclude")
        self.higher_precision = dict(self.higher_precision or {})

    def keeps(self, name: str) -> str | None:
        """Why module ``name`` stays in higher precision, or None if it is quantized."""
        if name in self.higher_precision:
            return self.higher_precision[name]
        if matches_any(compile_patterns(self.exclude), name):
            return "excluded by user"
        return None

    def calibrator_kwargs(self) -> dict[str, float]:
        return {"percentile": float(self.percentile)} if self.calibrator == "percentile" else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
