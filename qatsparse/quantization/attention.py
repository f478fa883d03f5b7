"""``nn.MultiheadAttention`` with fake quantizers where TensorRT quantizes attention.

Q/DQ go on the inputs and weights of the input projection (one packed GEMM in self-attention) and of
``out_proj`` (a quantized Linear child); optionally (``QuantConfig.attention_matmuls``) also on both
operands of Q·Kᵀ and of softmax·V, which TensorRT's fused INT8 attention kernels need.
The computation is :func:`qatsparse.attention.attention_forward`.
"""

from __future__ import annotations

import torch
from torch import nn

from qatsparse.attention import attention_forward, unsupported_reason
from qatsparse.quantization.config import QuantConfig
from qatsparse.quantization.fp16 import record_peak
from qatsparse.quantization.layers import QuantLayer, activation_quantizer, weight_quantizer
from qatsparse.quantization.quantizer import TensorQuantizer

#: Quantizers of the two attention matmuls: Q·Kᵀ (q, k) and softmax·V (probabilities, v).
MATMUL_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "softmax_quantizer", "v_bmm_quantizer")


def _weight_params(m: nn.MultiheadAttention) -> list[str]:
    if m.in_proj_weight is not None:
        return ["in_proj_weight"]
    return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


class QuantMultiheadAttention(QuantLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computed with plain ops and fake quantizers (see the module docstring).

    Quantizers: ``input_quantizer`` (the query; key and value too in self-attention),
    ``key_input_quantizer`` and ``value_input_quantizer`` (used in cross-attention only),
    ``in_proj_weight_quantizer`` (or ``q/k/v_proj_weight_quantizer``), and with
    ``attention_matmuls`` the four of :data:`MATMUL_QUANTIZERS`.

    Example:
        >>> from qatsparse.quantization import quantize_model
        >>> m = nn.Sequential(nn.MultiheadAttention(16, 2)); _ = quantize_model(m, QuantConfig())
        >>> type(m[0]).__name__, type(m[0].out_proj).__name__.startswith("Quant")
        ('QuantMultiheadAttention', True)
    """

    _qatsparse_float = nn.MultiheadAttention
    optional_quantizers = ("key_input_quantizer", "value_input_quantizer")

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        return unsupported_reason(module)  # type: ignore[arg-type]

    @classmethod
    def add_quantizers(cls, module: nn.Module, config: QuantConfig, device: torch.device) -> None:
        for name in ("input_quantizer", "key_input_quantizer", "value_input_quantizer"):
            module.add_module(name, activation_quantizer(config).to(device))
        for param in _weight_params(module):  # type: ignore[arg-type]
            module.add_module(f"{param}_quantizer", weight_quantizer(config, getattr(module, param), 0).to(device))
        if config.precision == "fp16" or config.attention_matmuls:
            for name in MATMUL_QUANTIZERS:
                module.add_module(name, activation_quantizer(config).to(device))

    def weight_quantizers(self) -> dict[str, TensorQuantizer]:
        return {p: getattr(self, f"{p}_quantizer") for p in _weight_params(self)}

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = attention_forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        if self._track_overflow:
            record_peak(self, query, out[0])
        return out
