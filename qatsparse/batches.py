"""How qatsparse reads a batch: which part is the model's input and which the target.

Layouts read without any code of yours:

* ``(inputs, targets)`` -- a tuple/list whose first element is the input (a tensor, or a tuple/list of
  tensors for a model with several positional inputs) and whose second element, if any, is the target
  (a tensor, or a tuple/list with one target per output). A bare tensor is an input without target.
* a dict (e.g. Hugging Face style ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``) -- the
  entries whose keys name parameters of the module's ``forward`` are its keyword inputs, and the entry
  named one of :data:`TARGET_KEYS` is the target.

A LightningModule with another layout defines ``batch_inputs(batch)`` -- returning a tensor, a tuple of
tensors (positional inputs) or a dict of tensors (keyword inputs) -- and ``batch_targets(batch)``;
they take precedence. Keyword inputs go through the whole pipeline: calibration calls
``model(**inputs)``, the ONNX graph's inputs are named after the keywords and ONNX Runtime/TensorRT are
fed by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

#: The model's inputs: positional (a tuple) or keyword (a dict, in the order of its keys).
Inputs = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]

#: Keys of a dict batch read as the target (the first one present).
TARGET_KEYS = ("labels", "label", "targets", "target", "y")

#: The fix named when a batch cannot be read.
FIX = (
    "define `batch_inputs(self, batch)` on the LightningModule returning the forward's inputs -- a tensor, a tuple "
    "of tensors (positional) or a dict of tensors (keyword) -- and `batch_targets(self, batch)` returning the "
    "target(s) (see qatsparse.batches)"
)


def describe(x: Any, depth: int = 0) -> str:
    """A short description of a batch's layout, for error messages.

    Example:
        >>> describe((torch.zeros(2, 3), {"y": torch.zeros(2)}))
        'tuple(Tensor[2, 3], dict(y=Tensor[2]))'
    """
    if isinstance(x, torch.Tensor):
        return f"Tensor[{', '.join(map(str, x.shape))}]"
    if depth > 2:
        return type(x).__name__
    if isinstance(x, Mapping):
        inner = ", ".join(f"{k}={describe(v, depth + 1)}" for k, v in list(x.items())[:8])
        return f"{type(x).__name__}({inner}{', ...' if len(x) > 8 else ''})"
    if isinstance(x, (tuple, list)):
        inner = ", ".join(describe(v, depth + 1) for v in x[:8])
        return f"{type(x).__name__}({inner}{', ...' if len(x) > 8 else ''})"
    return type(x).__name__


def _as_inputs(x: Any, source: str) -> Inputs:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    if isinstance(x, Mapping) and x and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in x.items()):
        return dict(x)
    raise TypeError(
        f"{source} is {describe(x)}: the model's inputs must be a tensor, a non-empty tuple/list of tensors "
        f"(positional) or a dict of tensors (keyword); {FIX}"
    )


def _as_tuple(x: Any, source: str) -> tuple[torch.Tensor, ...]:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    raise TypeError(f"{source} is {describe(x)}, not a tensor or a tuple of tensors; {FIX}")


def _forward_parameters(module: Any) -> tuple[list[str], bool]:
    """Names of ``module.forward``'s parameters and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return [], False
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _dict_inputs(module: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    names, var_kw = _forward_parameters(module)
    tensors = {k: v for k, v in batch.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    inputs = {k: v for k, v in tensors.items() if k not in TARGET_KEYS and (k in names or var_kw)}
    if not inputs:
        forward = f"forward({', '.join(names)})" if names else "its forward"
        raise TypeError(
            f"a dict batch {describe(batch)} has no tensor entry named after a parameter of "
            f"{type(module).__name__}.{forward}; {FIX}"
        )
    return inputs


def batch_inputs(module: Any, batch: Any) -> Inputs:
    """The model's inputs in ``batch``: a tuple (positional) or a dict (keyword inputs).

    Example:
        >>> [t.shape for t in batch_inputs(None, (torch.zeros(2, 3), torch.zeros(2)))]
        [torch.Size([2, 3])]
    """
    if hasattr(module, "batch_inputs"):
        return _as_inputs(module.batch_inputs(batch), f"{type(module).__name__}.batch_inputs(batch)")
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Mapping):
        return _dict_inputs(module, batch)
    if isinstance(batch, (tuple, list)) and batch:
        return _as_inputs(batch[0], f"the first element of the batch {describe(batch)}")
    raise TypeError(f"cannot read the model's inputs from a batch {describe(batch)}; {FIX}")


def batch_targets(module: Any, batch: Any) -> tuple[torch.Tensor, ...] | None:
    """The targets in ``batch`` (one per model output), or None when the batch has none.

    Example:
        >>> batch_targets(None, (torch.zeros(2, 3), torch.tensor([1, 2])))[0].tolist()
        [1, 2]
    """
    if hasattr(module, "batch_targets"):
        t = module.batch_targets(batch)
        return None if t is None else _as_tuple(t, f"{type(module).__name__}.batch_targets(batch)")
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
        return None if key is None else (batch[key],)
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return _as_tuple(batch[1], f"the second element (the target) of the batch {describe(batch)}")
    return None


def call_model(module: Any, inputs: Inputs) -> Any:
    """``module(*inputs)`` for positional inputs, ``module(**inputs)`` for keyword inputs.

    Example:
        >>> call_model(torch.nn.Identity(), (torch.ones(1),)).tolist()
        [1.0]
    """
    return module(**inputs) if isinstance(inputs, Mapping) else module(*inputs)


def input_tensors(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The input tensors in order (a dict's values in the order of its keys)."""
    return tuple(inputs.values()) if isinstance(inputs, Mapping) else tuple(inputs)


def input_names(inputs: Inputs) -> list[str] | None:
    """The keywords of keyword inputs, None for positional inputs."""
    return [str(k) for k in inputs] if isinstance(inputs, Mapping) else None


def inputs_to(inputs: Inputs, device: torch.device | str) -> Inputs:
    """``inputs`` moved to ``device`` (same structure)."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return tuple(t.to(device) for t in inputs)


def batch_size(inputs: Inputs) -> int:
    """Rows in the batch (the first dimension of the first input)."""
    return int(input_tensors(inputs)[0].shape[0])


def example_inputs(module: Any, dataloader: Any = None) -> Inputs:
    """Export example: ``module.example_input_array`` (Lightning's convention: a tuple means several
    positional inputs, a dict keyword inputs), else the inputs of the first batch of ``dataloader``."""
    ex = getattr(module, "example_input_array", None)
    if ex is not None:
        return _as_inputs(ex, f"{type(module).__name__}.example_input_array")
    if dataloader is None:
        raise ValueError("set `example_input_array` on the LightningModule or provide a validation dataloader")
    return batch_inputs(module, next(iter(dataloader)))


def as_outputs(y: Any) -> tuple[torch.Tensor, ...]:
    """A model's output as a tuple of tensors (one output -> a 1-tuple; a dict -> its values)."""
    if isinstance(y, Mapping):
        return tuple(y.values())
    return _as_tuple(y, "the model's output")
