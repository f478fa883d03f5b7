"""Find PyTorch weights in an exported ONNX graph by their values, not by the names the exporter chose.

Node names tell which module's ``forward`` emitted a node, not whose weight it multiplies: an
``nn.MultiheadAttention`` runs its projections inside ``F.multi_head_attention_forward``, torchvision's
Swin calls ``F.linear`` on ``self.qkv.weight`` from the attention block, and initializer names change
when the exporter folds a transpose or a quantization. So each weighted node's weight is followed back
to its constant (:mod:`qatsparse.export.graph`), evaluated as the node sees it (dequantized, transposed)
and compared with the PyTorch weights of the same shape. A node may hold a block of a weight's output
rows (the query rows of a packed attention projection in cross-attention), so one weight can map to
several nodes. Quantization and FP16 change the values a little; a node matches a weight when their
output channels agree up to scale and sign (BatchNorm folded into a conv scales its channels) within
:data:`MATCH_TOLERANCE`, preferring weights of the module the node's scope names.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from qatsparse.export.onnx import export_onnx
    >>> m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> p = export_onnx(m, [torch.zeros(1, 16)], tempfile.mkdtemp() + "/m.onnx")
    >>> found, missing = locate_weights(p, m, ["0", "2"]); found, missing
    ({'0': ['/0/Gemm'], '2': ['/2/Gemm']}, [])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qatsparse.sparsity.weights import PrunableWeight

#: Largest distance (RMS over output channels of the distance between unit-norm channels, up to sign)
#: between a node's weight and a PyTorch weight that still counts as the same weight. INT8 weights are
#: about 0.01 away (half a quantization step), FP16 0.0005, a weight with BatchNorm folded in 0; two
#: unrelated weights about 1.4.
MATCH_TOLERANCE = 0.25


def _rows(a: np.ndarray, out_axis: int, in_axis: int) -> np.ndarray:
    """``a`` as (output channels, everything else), output axis first and input axis second, each row scaled
    to unit norm: the exporter folds BatchNorm into the preceding conv, which scales every output channel
    (possibly by a negative factor) and keeps its zeros."""
    out_axis, in_axis = out_axis % a.ndim, in_axis % a.ndim
    rows = np.moveaxis(a, (out_axis, in_axis), (0, 1)).reshape(a.shape[out_axis], -1).astype(np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)


def _distance(c: np.ndarray, p: np.ndarray) -> float:
    """RMS over rows of the distance between unit rows, up to each row's sign (0 = same weight, ~1.4 = unrelated)."""
    d = np.minimum(np.linalg.norm(c - p, axis=1), np.linalg.norm(c + p, axis=1))
    return float(np.sqrt(np.mean(d**2))) if d.size else 0.0


def _offsets(c: np.ndarray, p: np.ndarray) -> list[int]:
    """Row offsets ``o`` at which ``p[o : o + len(c)]`` may equal ``c`` (cheap test on row 0)."""
    rows = p.shape[0] - c.shape[0] + 1
    if rows <= 0:
        return []
    if rows == 1:
        return [0]
    head = c[0]
    d = np.minimum(np.linalg.norm(p[:rows] - head, axis=1), np.linalg.norm(p[:rows] + head, axis=1))
    return [int(o) for o in np.nonzero(d < 2 * MATCH_TOLERANCE)[0]]


@torch.no_grad()
def _effective(w: PrunableWeight) -> np.ndarray:
    """The weight as the model computes with it: through its fake quantizer when the layer has one (a weight
    that drifted beyond its calibrated range is clamped there, and so in the exported graph)."""
    t = w.weight.detach()
    quantizer = w.module.weight_quantizers().get(w.param) if hasattr(w.module, "weight_quantizers") else None
    if quantizer is not None:
        t = quantizer(t)
    return t.float().cpu().numpy()


def _in_scope(node_module: str, weight_module: str) -> bool:
    if not node_module or not weight_module:
        return True
    return (
        node_module == weight_module
        or node_module.startswith(weight_module + ".")
        or weight_module.startswith(node_module + ".")
    )


def locate_weights(
    onnx_model: str | Path | Any, model: nn.Module, keys: Sequence[str]
) -> tuple[dict[str, list[str]], list[str]]:
    """``({weight key: [node names]}, [keys not found])`` for the given prunable weights of ``model``.

    Args:
        onnx_model: an ONNX file or ``onnx.ModelProto`` exported from ``model`` (or from a copy with the
            same weights); an FP16 graph may come from the FP32 model.
        model: the PyTorch model; for a Q/DQ graph the quantized model (weights are compared after their
            fake quantization).
        keys: weight keys (see :mod:`qatsparse.sparsity.weights`).
    """
    import onnx

    from qatsparse.export.graph import OnnxGraph, module_name_of_node, weight_uses
    from qatsparse.sparsity.weights import prunable_weights

    proto = onnx.load(str(onnx_model)) if isinstance(onnx_model, (str, Path)) else onnx_model
    graph = OnnxGraph(proto)
    weights = prunable_weights(model)
    wanted = {}
    for k in keys:
        if k in weights:
            w = weights[k]
            wanted[k] = (w, _rows(_effective(w), w.out_axis, w.in_axis))
    found: dict[str, list[str]] = {}
    for use in weight_uses(graph).values():
        trace = graph.trace_constant(use.input)
        if trace is None or trace.array.ndim < 2:
            continue
        c = _rows(trace.values(), use.out_axis, use.in_axis)
        scope = module_name_of_node(use.node)
        best: tuple[bool, float, str] | None = None
        for k, (w, p) in wanted.items():
            if p.shape[1] != c.shape[1] or p.shape[0] < c.shape[0]:
                continue
            for o in _offsets(c, p):
                err = _distance(c, p[o : o + c.shape[0]])
                if err < MATCH_TOLERANCE:
                    cand = (not _in_scope(scope, w.module_name), err, k)
                    best = cand if best is None or cand < best else best
        if best is not None:
            found.setdefault(best[2], []).append(use.node)
    missing = [k for k in keys if k not in found]
    return found, missing


#: Why a pruned weight has no node in an exported graph although the lookup works (see :func:`absent_reasons`).
NOT_RUN_IN_EVAL = "not run in eval mode (e.g. an auxiliary training head): the exported graph has no node for it"
CONSTANT_INPUT = (
    "its input does not depend on the model's inputs (e.g. a position-bias MLP over a fixed coordinate table): "
    "the exporter computed it into a constant"
)


def _perturbed(t: Any, g: torch.Generator) -> Any:
    """Another input of the same shape and type: float tensors get noise, integer ones are rolled."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return t
    if t.is_floating_point():
        return t + torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) * (t.float().std().nan_to_num(1.0) + 1)
    if t.dtype == torch.bool:
        return t
    return torch.roll(t, shifts=1, dims=-1)


@torch.no_grad()
def absent_reasons(model: nn.Module, inputs: Any, keys: Sequence[str]) -> dict[str, str]:
    """Why some prunable weights of ``model`` have no node in its exported graph: ``{key: reason}`` for the keys
    whose module does not run in eval mode on ``inputs`` (:data:`NOT_RUN_IN_EVAL`) or runs on the same input
    whatever the model's inputs are (:data:`CONSTANT_INPUT`: the exporter folds it). Keys not listed have no
    such explanation. The model runs twice in eval mode (``inputs`` and a perturbed copy) on a copy.

    Example:
        >>> class M(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.bias_mlp, self.aux = nn.Linear(16, 8), nn.Linear(4, 8), nn.Linear(16, 8)
        ...     def forward(self, x):
        ...         y = self.fc(x) + self.bias_mlp(torch.ones(1, 4))
        ...         return y + self.aux(x) if self.training else y
        >>> sorted(absent_reasons(M(), (torch.randn(2, 16),), ["fc", "bias_mlp", "aux"]))
        ['aux', 'bias_mlp']
    """
    import copy

    from qatsparse.attention import fast_paths_off
    from qatsparse.batches import call_model
    from qatsparse.sparsity.weights import prunable_weights

    model = copy.deepcopy(model).eval()
    weights = prunable_weights(model)
    owners = {k: weights[k].module for k in keys if k in weights}
    seen: dict[str, list[list[torch.Tensor]]] = {k: [[], []] for k in owners}
    run = [0]

    def hook(key: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            seen[key][run[0]].extend(t.detach().clone() for t in tensors[:1])

        return record

    handles = [m.register_forward_pre_hook(hook(k), with_kwargs=True) for k, m in owners.items()]
    g = torch.Generator().manual_seed(0)
    other = (
        {k: _perturbed(v, g) for k, v in inputs.items()}
        if isinstance(inputs, dict)
        else tuple(_perturbed(t, g) for t in inputs)
    )
    try:
        with fast_paths_off():
            for i, feed in enumerate((inputs, other)):
                run[0] = i
                call_model(model, feed)
    except Exception:  # the model does not run on these inputs: nothing can be said
        return {}
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, (a, b) in seen.items():
        if not a:
            out[k] = NOT_RUN_IN_EVAL
        elif len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b)):
            out[k] = CONSTANT_INPUT
    return out
