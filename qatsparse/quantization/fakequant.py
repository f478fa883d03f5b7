"""INT8 fake quantization: PyTorch's fused kernel in eager mode, a fusable formulation under compile.

Both compute exactly the same numbers (tests compare them bit for bit, forward and backward):
``q = round_half_even(x * (1 / scale))``, ``y = clamp(q, qmin, qmax) * scale`` with
``scale = amax / 127``, and a straight-through gradient where ``qmin <= q <= qmax``.

- Eager: ``torch.fake_quantize_per_{tensor,channel}_affine`` -- one ATen kernel, and the op the
  TorchScript ONNX exporter turns into QuantizeLinear/DequantizeLinear. (Under DDP the callbacks give
  ``channels_last`` 1x1 conv weights the strides of the gradients this op writes:
  :func:`qatsparse.sharding.ddp_gradient_layout`.)
- Under ``torch.compile`` the ATen op is an opaque call that saves a boolean mask for the backward and
  cannot fuse with the BatchNorm/ReLU kernels around it. The same arithmetic written with elementwise
  ops lets Inductor fuse it into its neighbours and recompute the mask in the backward (hand-written
  because no library ships a fusable fake quantization with PyTorch's exact rounding).
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def _scale(amax: torch.Tensor) -> torch.Tensor:
    # amax must be > 0 (TensorQuantizer.load_amax makes it so). No clamp here: the scale must stay a
    # constant that the exporter folds, TensorRT needs Q/DQ scales as initializers.
    return amax.float() / INT8_MAX


def fake_quantize_int8_aten(x: torch.Tensor, amax: torch.Tensor, axis: int | None, narrow_range: bool) -> torch.Tensor:
    """The reference: PyTorch's fake-quantize ops (also what the ONNX export traces).

    Example:
        >>> fake_quantize_int8_aten(torch.tensor([0.26, 2.0]), torch.tensor(1.27), None, False).tolist()
        [0.25999999046325684, 1.2699999809265137]
    """
    scale = _scale(amax)
    qmin = -INT8_MAX if narrow_range else -INT8_MAX - 1
    if axis is None:
        zp = torch.zeros((), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, INT8_MAX)
    zp = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, INT8_MAX)


def _torch_exporting() -> bool:
    """True under ``torch.export`` only.

    Not ``torch.compiler.is_exporting()``: torch 2.11's Dynamo folds that call to True under *every*
    ``torch.compile`` trace (measured on the H200 image: a compiled function saw True; torch 2.14 reads the
    flag), which sent compiled QAT through the opaque ATen op. The flag behind it is what ``torch.export``
    sets, and Dynamo reads a module global like any constant, with a guard.
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def fake_quantize_int8_fusable(
    x: torch.Tensor, amax: torch.Tensor, axis: int | None, narrow_range: bool
) -> torch.Tensor:
    """The same function as :func:`fake_quantize_int8_aten` from elementwise ops (fusable by Inductor).

    Example:
        >>> fake_quantize_int8_fusable(torch.tensor([0.26, 2.0]), torch.tensor(1.27), None, False).tolist()
        [0.25999999046325684, 1.2699999809265137]
    """
    scale = _scale(amax)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    inv_scale = 1.0 / scale
    qmin = float(-INT8_MAX if narrow_range else -INT8_MAX - 1)
    xf = x.float()
    q = torch.round(xf * inv_scale)
    inside = (q >= qmin) & (q <= INT8_MAX)
    y = (torch.clamp(q, qmin, INT8_MAX) * scale).to(x.dtype)
    # Straight-through estimator: value y, gradient 1 where the value was not clamped, else 0.
    ste = x * inside.to(x.dtype)
    return ste + (y - ste).detach()


def fake_quantize_int8(x: torch.Tensor, amax: torch.Tensor, axis: int | None, narrow_range: bool) -> torch.Tensor:
    """Symmetric INT8 fake quantization, scale = amax / 127, zero-point 0, round half to even.

    ``narrow_range`` clamps to [-127, 127] (TensorRT's weight range) instead of [-128, 127]. Picks the
    ATen kernel in eager mode and under ``torch.export`` (which exporters map to Q/DQ), the fusable
    formulation while ``torch.compile`` traces.

    Example:
        >>> fake_quantize_int8(torch.tensor([0.26, 2.0]), torch.tensor(1.27), None, False).tolist()
        [0.25999999046325684, 1.2699999809265137]
    """
    if torch.compiler.is_compiling() and not _torch_exporting():
        return fake_quantize_int8_fusable(x, amax, axis, narrow_range)
    # eager, and torch.export (the dynamo ONNX exporter): the ATen op, which exporters map to Q/DQ
    return fake_quantize_int8_aten(x, amax, axis, narrow_range)
