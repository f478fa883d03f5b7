"""Adaptive pooling the ONNX exporter cannot express, found on a forward before training.

PyTorch's TorchScript exporter writes ``nn.AdaptiveAvgPool*``/``nn.AdaptiveMaxPool*`` as a fixed pooling whose
kernel is input size / output size, so it refuses ("output size that are not factor of input size") when an
input dimension is not a multiple of the output's -- e.g. torchvision VGG's ``AdaptiveAvgPool2d((7, 7))`` on a
2x2 feature map (64 px images; 224 px give 7x7). An output size of 1 (global pooling) always exports. Found
after training this costs the run's export; :func:`adaptive_pool_problems` finds it on one forward.

Example:
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.AdaptiveAvgPool2d((7, 7)))
    >>> with adaptive_pool_problems(m) as problems:
    ...     _ = m(torch.zeros(1, 3, 64, 64))
    >>> [p.split(":")[0] for p in problems]
    ['1 (AdaptiveAvgPool2d(output_size=(7, 7))) gets a 8x8 input']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_ADAPTIVE = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def _unexportable(shape: tuple[int, ...], output_size: Any) -> tuple[list[int], list[int]] | None:
    """(input dims, output dims) when some input dim is not a multiple of its output dim, else None."""
    n = len(output_size) if isinstance(output_size, (tuple, list)) else None
    dims = list(shape[-n:]) if n else [shape[-1]]
    outs = list(output_size) if n else [output_size]
    outs = [d if o is None else int(o) for d, o in zip(dims, outs)]
    if all(o == 1 or d % o == 0 for d, o in zip(dims, outs)):
        return None
    return dims, outs


@contextlib.contextmanager
def adaptive_pool_problems(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every forward of ``model``'s adaptive pooling modules is checked; the list yielded
    collects one message per module whose input the ONNX exporter cannot pool to its output size."""
    problems: list[str] = []
    seen: set[str] = set()
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, _ADAPTIVE)}

    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        name = names.get(id(module), type(module).__name__)
        if not isinstance(x, torch.Tensor) or name in seen:
            return
        found = _unexportable(tuple(x.shape), module.output_size)  # type: ignore[arg-type]
        if found is not None:
            seen.add(name)
            dims, outs = found
            problems.append(
                f"{name} ({module}) gets a {'x'.join(map(str, dims))} input: the ONNX exporter needs each input "
                f"size to be a multiple of the output size {'x'.join(map(str, outs))}"
            )

    handles = [m.register_forward_pre_hook(check) for m in model.modules() if isinstance(m, _ADAPTIVE)]
    try:
        yield problems
    finally:
        for h in handles:
            h.remove()
