"""``nn.MultiheadAttention`` written with plain ops, and PyTorch's attention fast paths switched off.

PyTorch's ``nn.MultiheadAttention`` runs its projections inside ``F.multi_head_attention_forward`` (no
``nn.Linear`` is called, so nothing can be quantized by swapping layers), its exported ONNX graph fixes
the sequence length of the example input into its reshapes, and in eval mode without gradients
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` take a fused
"fast path" (``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``, nested
tensors) that bypasses every submodule. This module provides:

* :func:`attention_forward`: the same computation as ``nn.MultiheadAttention.forward`` (self- and
  cross-attention, ``batch_first`` both ways, packed ``in_proj_weight`` or separate
  ``q/k/v_proj_weight``, masks, ``need_weights``, dropout) from ``F.linear``, reshapes and matmuls; each
  tensor that TensorRT quantizes passes through the module's quantizer of that name when it has one
  (see :class:`qatsparse.quantization.attention.QuantMultiheadAttention`). Its reshapes keep the batch
  and sequence lengths symbolic in the ONNX graph.
* :class:`ExplicitMultiheadAttention` and :func:`explicit_attention`: plain attention modules switched
  to that forward (the export does this on its copy of the model).
* :func:`fast_paths_off`: turn off ``torch.backends.mha`` fast paths (which also disables the nested
  tensors of ``nn.TransformerEncoder``) while qatsparse needs the real modules; the previous setting is
  restored afterwards.

Example:
    >>> mha = nn.MultiheadAttention(16, 2, batch_first=True).eval(); x = torch.randn(3, 5, 16)
    >>> torch.allclose(attention_forward(mha, x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def fast_paths_off() -> Iterator[None]:
    """Within the block, PyTorch's MHA/Transformer fast paths and nested tensors are off (re-entrant).

    Example:
        >>> with fast_paths_off():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def unsupported_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why :func:`attention_forward` cannot stand in for this module (``add_bias_kv``/``add_zero_attn``), or None."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "MultiheadAttention with add_bias_kv=True: not supported by qatsparse's attention (left as it is)"
    if mha.add_zero_attn:
        return "MultiheadAttention with add_zero_attn=True: not supported by qatsparse's attention (left as it is)"
    return None


def _q(mha: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the module's quantizer ``name`` when it has one (plain attention has none)."""
    quantizer = getattr(mha, name, None)
    return x if quantizer is None else quantizer(x)


def _projections(
    mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of shape (..., E): one GEMM on the packed weight for self-attention, else one per input
    (key and value share the key/value rows when they are the same tensor, as in PyTorch)."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = _q(mha, "in_proj_weight_quantizer", mha.in_proj_weight)  # per-channel: rows stay rows
        b = mha.in_proj_bias
        if query is key and key is value:
            return F.linear(_q(mha, "input_quantizer", query), w, b).chunk(3, dim=-1)
        wq, wk, wv = w.split(e)
        bq, bk, bv = b.split(e) if b is not None else (None, None, None)
        q = F.linear(_q(mha, "input_quantizer", query), wq, bq)
        if key is value:
            kv_b = b[e:] if b is not None else None
            k, v = F.linear(_q(mha, "key_input_quantizer", key), w[e:], kv_b).chunk(2, dim=-1)
            return q, k, v
        k = F.linear(_q(mha, "key_input_quantizer", key), wk, bk)
        v = F.linear(_q(mha, "value_input_quantizer", value), wv, bv)
        return q, k, v
    b = mha.in_proj_bias
    bq, bk, bv = b.split(e) if b is not None else (None, None, None)
    q = F.linear(_q(mha, "input_quantizer", query), _q(mha, "q_proj_weight_quantizer", mha.q_proj_weight), bq)
    k = F.linear(_q(mha, "key_input_quantizer", key), _q(mha, "k_proj_weight_quantizer", mha.k_proj_weight), bk)
    v = F.linear(_q(mha, "value_input_quantizer", value), _q(mha, "v_proj_weight_quantizer", mha.v_proj_weight), bv)
    return q, k, v


def attention_forward(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention.forward`` from plain ops (same arguments, same results up to rounding).

    Quantizers used when the module has them: ``input_quantizer`` (query; key and value too in
    self-attention, where one packed GEMM computes q, k and v), ``key_input_quantizer``,
    ``value_input_quantizer`` (cross-attention), ``in_proj_weight_quantizer`` or
    ``q/k/v_proj_weight_quantizer``, and for the two attention matmuls ``q_bmm_quantizer``,
    ``k_bmm_quantizer``, ``softmax_quantizer``, ``v_bmm_quantizer``. ``out_proj`` is called as a module
    (it is quantized like any Linear).
    """
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention requires)")
    unbatched = query.dim() == 2
    batch_dim = 0 if mha.batch_first else 1
    if unbatched:
        query, key, value = _batched(query, key, value, batch_dim)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    heads, head_dim = mha.num_heads, mha.head_dim
    q, k, v = _projections(mha, query, key, value)

    def split_heads(t: torch.Tensor) -> torch.Tensor:  # (N, L, E) or (L, N, E) -> (N, H, L, D)
        t = t.unflatten(-1, (heads, head_dim))
        return t.transpose(1, 2) if mha.batch_first else t.permute(1, 2, 0, 3)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    mask = _combined_mask(attn_mask, key_padding_mask, q, heads)
    quantize_matmuls = hasattr(mha, "q_bmm_quantizer")
    dropout = mha.dropout if mha.training else 0.0
    if need_weights or quantize_matmuls or torch.onnx.is_in_onnx_export():
        q = _q(mha, "q_bmm_quantizer", q * (1.0 / math.sqrt(head_dim)))
        scores = q @ _q(mha, "k_bmm_quantizer", k).transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        out = _q(mha, "softmax_quantizer", weights) @ _q(mha, "v_bmm_quantizer", v)
    else:  # the fused kernel where it exists (training on GPUs); same math
        weights = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    out = out.transpose(1, 2) if mha.batch_first else out.permute(2, 0, 1, 3)
    out = mha.out_proj(out.flatten(-2))
    if unbatched:
        out = out.squeeze(batch_dim)
    if not need_weights:
        return out, None
    assert weights is not None
    if average_attn_weights:
        weights = weights.mean(dim=1)
    return out, weights.squeeze(0) if unbatched else weights


def _batched(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add the batch axis, keeping which of the three are the same tensor (self-attention is decided by it)."""
    q = query.unsqueeze(dim)
    k = q if key is query else key.unsqueeze(dim)
    v = k if value is key else (q if value is query else value.unsqueeze(dim))
    return q, k, v


def _combined_mask(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, q: torch.Tensor, heads: int
) -> torch.Tensor | None:
    """One additive float mask broadcastable to the scores (N, H, L, S), as PyTorch builds it."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=q.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=q.dtype, check_other=False
    )
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.unflatten(0, (-1, heads))
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        mask = kpm if mask is None else mask + kpm
    return mask


class ExplicitMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computed by :func:`attention_forward` (no fast path, symbolic shapes in ONNX).

    Made by changing the class of an existing module in place (:func:`explicit_attention`); parameters
    and state_dict keys are unchanged.

    Example:
        >>> m = nn.Sequential(nn.MultiheadAttention(8, 2)); _ = explicit_attention(m); type(m[0]).__name__
        'ExplicitMultiheadAttention'
    """

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
        return attention_forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )


def explicit_attention(model: nn.Module) -> list[str]:
    """Switch every plain ``nn.MultiheadAttention`` of ``model`` to :class:`ExplicitMultiheadAttention`, in place.

    Modules :func:`attention_forward` does not cover (``add_bias_kv``, ``add_zero_attn``) and subclasses are
    left alone. Returns the names of the switched modules.
    """
    switched = []
    for name, m in model.named_modules():
        if type(m) is nn.MultiheadAttention and unsupported_reason(m) is None:
            m.__class__ = ExplicitMultiheadAttention
            switched.append(name)
    return switched
