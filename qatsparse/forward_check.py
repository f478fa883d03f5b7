"""Running the model on a batch before training without leaving a trace (eval mode, no gradients, the RNG
forked, modes and FP16 overflow records restored), with an error that names the batch layout and the fix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from qatsparse.batches import FIX, Inputs, as_outputs, batch_inputs, call_model, describe


@contextlib.contextmanager
def inference_isolated(module: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, the RNG forked, and afterwards every submodule's train/eval mode and every
    FP16 overflow record as before: a forward here leaves no trace in the training run."""
    modes = [(m, m.training) for m in module.modules()]
    peaks = [(m, m._overflow_peak) for m in module.modules() if hasattr(m, "_overflow_peak")]
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            module.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        for m, peak in peaks:
            m._overflow_peak = peak


def run_forward(module: nn.Module, inputs: Inputs, where: str, batch: Any = None) -> Any:
    """Run ``module`` on ``inputs`` (isolated, see :func:`inference_isolated`); the output must be tensors.

    Raises:
        TypeError: naming the batch layout, the inputs, the forward's error and the fix.
    """
    try:
        with inference_isolated(module):
            out = call_model(module, inputs)
        as_outputs(out)
    except Exception as e:
        how = "module(**inputs)" if isinstance(inputs, Mapping) else "module(*inputs)"
        read = f"batch {describe(batch)} -> " if batch is not None else ""
        raise TypeError(
            f"{where}: {type(module).__name__} cannot take the inputs qatsparse reads: {read}inputs "
            f"{describe(inputs)} -> {how} raised {type(e).__name__}: {e}. If these are not the forward's inputs "
            f"(or it returns something other than tensors, or a tuple or dict of them), {FIX}"
        ) from e
    return out


def check_forward(module: nn.Module, batch: Any, where: str) -> tuple[Inputs, Any]:
    """Read ``batch``'s inputs (see :mod:`qatsparse.batches`) and run ``module`` on them; returns both."""
    try:
        inputs = batch_inputs(module, batch)
    except TypeError as e:
        raise TypeError(f"{where}: {e}") from None
    return inputs, run_forward(module, inputs, where, batch)
