"""Layers qatsparse leaves as they are, each with the reason: nothing weighted is skipped silently.

Both summaries (2:4 pruning and quantization) list these next to the layers they compress:
recurrent layers, embeddings, layer types without a TensorRT path for the compression, and modules
that hold weight matrices of their own and use them in their own ``forward`` (e.g. a ViT's class
token), which no layer swap can reach. One-dimensional parameters (norm scales, biases) are not
listed: TensorRT folds or runs them elementwise, there is nothing to prune or quantize.

Example:
    >>> m = nn.Sequential(nn.Embedding(10, 16), nn.LSTM(16, 16))
    >>> sorted(not_compressed(m, "sparsity"))
    ['0', '1']
"""

from __future__ import annotations

from typing import Literal

from torch import nn

What = Literal["sparsity", "quantization"]

_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
_REASONS: list[tuple[tuple[type[nn.Module], ...], str]] = [
    (
        _RECURRENT,
        "recurrent layer ({type}): TensorRT runs it as an RNN layer with no sparse or INT8 Q/DQ kernels; "
        "left in higher precision as it is",
    ),
    (
        (nn.Embedding, nn.EmbeddingBag),
        "embedding ({type}): a table lookup (Gather), not a GEMM; nothing for sparse or INT8 kernels",
    ),
    ((nn.Bilinear,), "{type}: no TensorRT GEMM maps to it; not compressed"),
    (
        (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d),
        "{type}: not compressed by qatsparse (Conv1d/Conv2d/ConvTranspose2d/Linear/attention are)",
    ),
]
_SPARSITY_ONLY: list[tuple[tuple[type[nn.Module], ...], str]] = [
    (
        (nn.ConvTranspose2d,),
        "{type}: TensorRT has no sparse kernels for deconvolution (quantized, not pruned)",
    ),
]
#: Modules whose own parameters are handled by the layer itself (a Conv/Linear/attention weight, a norm).
_HANDLED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.MultiheadAttention)


def _own_matrices(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]


def not_compressed(model: nn.Module, what: What = "sparsity") -> dict[str, str]:
    """``{module name: reason}`` for every module with weights that ``what`` (2:4 pruning or quantization)
    leaves as it is because of its type -- shape-based skips (odd widths, grouped convs) are reported by
    the compression itself.

    Example:
        >>> not_compressed(nn.Sequential(nn.GRU(8, 8)))["0"].split(":")[0]
        'recurrent layer (GRU)'
    """
    from qatsparse.sparsity.weights import is_hf_conv1d

    table = _REASONS + (_SPARSITY_ONLY if what == "sparsity" else [])
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        reason = next((why for types, why in table if isinstance(m, types)), None)
        if reason is not None:
            out[name] = reason.format(type=type(m).__name__)
            continue
        if isinstance(m, _HANDLED) or is_hf_conv1d(m) or _is_quantizer(m):
            continue
        own = _own_matrices(m)
        if own:
            out[name] = (
                f"{type(m).__name__} uses its own parameter(s) {', '.join(own)} in its forward: not a "
                "Conv/Linear/attention weight qatsparse can reach"
            )
    return out


def _is_quantizer(m: nn.Module) -> bool:
    return type(m).__name__ == "TensorQuantizer"
