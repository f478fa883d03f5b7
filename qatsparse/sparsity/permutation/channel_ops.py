"""What the channel analysis knows of torch ops and modules: which keep every channel in place (elementwise,
pooling, normalisation per channel), which reshape, the layers it follows, and helpers to read fx nodes."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

#: Layers the analysis follows (their exact forward; subclasses with their own are opaque).
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
STANDARD_FORWARD = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Linear.forward}

UNARY_FUNCS = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu,
    F.selu, F.celu, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, torch.relu, torch.sigmoid,
    torch.tanh, torch.exp, torch.abs, torch.neg, torch.square, torch.sqrt, torch.clamp, torch.clip,
    torch.dropout, torch.nn.functional.sigmoid, torch.nn.functional.tanh, operator.neg, torch.erf,
}  # fmt: skip
UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "square", "sqrt", "clamp",
    "clamp_", "clip", "clamp_min", "clamp_min_", "clamp_max", "contiguous", "clone", "detach", "float",
    "half", "bfloat16", "erf", "pow",
}  # fmt: skip
BINARY_FUNCS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow,
}  # fmt: skip
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
RESHAPE_METHODS = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "view_as", "reshape_as"}
POOL_FUNCS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.max_pool1d, F.max_pool2d, F.interpolate, torch.nn.functional.upsample,
}  # fmt: skip
SHAPE_ONLY_METHODS = {"size", "dim", "numel", "ndimension", "is_contiguous", "get_device"}
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def stochastic_depth_op() -> Any:
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    return stochastic_depth


def reshaped_axis(shape: tuple[int, ...], axis: int, out: tuple[int, ...]) -> int | None:
    """Where channel ``axis`` of ``shape`` lands in ``out`` when the reshape keeps it whole, else None.

    The channel index keeps its place in the flat layout exactly when some output dimension has its
    size and the dimensions before it hold as many elements as those before the channel axis.
    """
    before = 1
    for d in shape[:axis]:
        before *= d
    acc = 1
    for j, d in enumerate(out):
        if acc == before and d == shape[axis]:
            return j
        acc *= d
    return None


def op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return f".{t}()"
    return getattr(t, "__name__", str(t))


def getattr_path(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def flatten_args(x: Any) -> Iterator[Any]:
    if isinstance(x, (list, tuple)):
        for i in x:
            yield from flatten_args(i)
    elif isinstance(x, dict):
        for i in x.values():
            yield from flatten_args(i)
    elif isinstance(x, slice):
        yield from flatten_args((x.start, x.stop, x.step))
    else:
        yield x
