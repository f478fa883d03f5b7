"""Dynamic axes beyond the batch: which input axes may vary, their TensorRT range, and a check that they do.

Every input's axis 0 is the batch (``"batch"``). More axes are declared as ``{input name: {axis: dim name}}``
(``TensorRTExport(dynamic_axes=...)``), or found by convention (``dynamic_axes="auto"``, the default):
an **integer input of rank >= 2** (token ids, attention masks, position ids) gets axis 1 named
``"sequence"``; float inputs (images, features) keep their other axes fixed unless declared (e.g.
``{"input": {2: "height", 3: "width"}}``). Inputs sharing a dim name share its size.

The names are written into the ONNX graph as ``dim_param`` (read back with :func:`dynamic_axes_of` or
:func:`qatsparse.export.profile.onnx_input_dims`), which is where the TensorRT build, the hand-off
``build.sh`` and anything else building engines from the file find them; each named dim gets its
(min, opt, max) for TensorRT's optimization profile from ``dim_ranges`` (the batch from ``batch_sizes``;
see :func:`qatsparse.export.profile.profile_shapes`). After the export, :func:`check_dynamic_axes` runs
ONNX Runtime at another size of each named dim: a graph that fixed the example's size into a reshape fails
there, not in deployment.

Example:
    >>> conventional_axes([torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 3, 8, 8)], ["ids", "img"])
    {'ids': {1: 'sequence'}}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

BATCH = "batch"
SEQUENCE = "sequence"
AxesSpec = Mapping[str, Mapping[int, str]]
Range = tuple[int, int, int]
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def conventional_axes(inputs: Sequence[torch.Tensor], names: Sequence[str]) -> dict[str, dict[int, str]]:
    """Axis 1 of every integer input of rank >= 2 is ``"sequence"`` (the documented convention)."""
    return {
        n: {1: SEQUENCE}
        for n, t in zip(names, inputs)
        if t.dim() >= 2 and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    }


def check_axes_spec(spec: Any, what: str = "dynamic_axes") -> dict[str, dict[int, str]]:
    """Validate ``{input name: {axis: dim name}}`` (axis >= 1; axis 0 is always ``"batch"``).

    Raises:
        ValueError: naming the argument, the bad entry and the expected form.
    """
    form = f"{what} must be 'auto', None or {{input name: {{axis: dim name}}}}, e.g. {{'input_ids': {{1: 'sequence'}}}}"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{form}; got {spec!r}")
    out: dict[str, dict[int, str]] = {}
    for name, axes in spec.items():
        if not isinstance(axes, Mapping):
            raise ValueError(f"{form}; entry {name!r} is {axes!r}")
        out[str(name)] = {}
        for axis, dim in axes.items():
            if isinstance(axis, bool) or not isinstance(axis, int) or axis < 1:
                raise ValueError(f"{what}[{name!r}]: axis {axis!r} must be an integer >= 1 (axis 0 is 'batch')")
            if not isinstance(dim, str) or not _NAME.match(dim) or dim == BATCH:
                raise ValueError(f"{what}[{name!r}][{axis}]: dim name {dim!r} must be an identifier other than 'batch'")
            out[str(name)][axis] = dim
    return out


def check_dim_ranges(ranges: Any) -> dict[str, Range]:
    """Validate ``{dim name: (min, opt, max)}`` (``1 <= min <= opt <= max``) for the TensorRT profile."""
    from qatsparse.export.profile import _check_range

    if ranges is None:
        return {}
    if not isinstance(ranges, Mapping):
        raise ValueError(
            f"dim_ranges must be {{dim name: (min, opt, max)}}, e.g. {{'sequence': (1, 128, 512)}}; got {ranges!r}"
        )
    return {str(d): _check_range(f"dim_ranges[{d!r}]", r) for d, r in ranges.items()}


def resolve_axes(
    declared: AxesSpec | str | None, inputs: Sequence[torch.Tensor], names: Sequence[str]
) -> tuple[dict[str, dict[int, str]], bool]:
    """The non-batch dynamic axes to export, and whether they were declared (True) or found by convention.

    Raises:
        ValueError: a declared input name is not an input, or an axis is beyond the input's rank.
    """
    if declared is None:
        return {}, True
    if isinstance(declared, str):
        if declared != "auto":
            raise ValueError(f"dynamic_axes must be 'auto', None or a mapping, got {declared!r}")
        return conventional_axes(inputs, names), False
    spec = check_axes_spec(declared)
    ranks = {n: t.dim() for n, t in zip(names, inputs)}
    for name, axes in spec.items():
        if name not in ranks:
            raise ValueError(f"dynamic_axes names input {name!r}; the inputs are {list(names)}")
        bad = [a for a in axes if a >= ranks[name]]
        if bad:
            raise ValueError(f"dynamic_axes[{name!r}]: axes {bad} beyond the input's rank {ranks[name]}")
    return spec, True


def onnx_dynamic_axes(names: Sequence[str], axes: Mapping[str, Mapping[int, str]], batch: bool = True) -> dict:
    """The ``dynamic_axes`` argument of ``torch.onnx.export`` for these inputs (batch first)."""
    out: dict[str, dict[int, str]] = {}
    for n in names:
        entry = {0: BATCH} if batch else {}
        entry.update(axes.get(n, {}))
        if entry:
            out[n] = entry
    return out


def dynamic_axes_of(path: str | Path) -> dict[str, dict[int, str]]:
    """``{input name: {axis: dim name}}`` of an ONNX file's named dynamic input dims, the batch included
    (from :func:`qatsparse.export.profile.onnx_input_dims`).

    Example:
        >>> import tempfile
        >>> from torch import nn
        >>> from qatsparse.export.onnx import export_onnx
        >>> dynamic_axes_of(export_onnx(nn.Linear(2, 2), [torch.zeros(1, 2)], tempfile.mkdtemp() + "/m.onnx"))
        {'input': {0: 'batch'}}
    """
    from qatsparse.export.profile import onnx_input_dims

    out = {}
    for name, dims in onnx_input_dims(path).items():
        named = {i: d for i, d in enumerate(dims) if isinstance(d, str) and d != "?"}
        if named:
            out[name] = named
    return out


def _resized(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``t`` with ``size`` entries along ``axis``: a prefix of it, or it repeated (valid token ids stay valid)."""
    if size <= t.shape[axis]:
        return t.narrow(axis, 0, size)
    reps = [1] * t.dim()
    reps[axis] = -(-size // t.shape[axis])
    return t.repeat(*reps).narrow(axis, 0, size)


def check_dynamic_axes(
    path: str | Path, inputs: Sequence[torch.Tensor], axes: Mapping[str, Mapping[int, str]]
) -> dict[str, str]:
    """Run ONNX Runtime on ``path`` at another size of every named non-batch dim; ``{dim: problem}`` for the
    dims the graph does not accept (it fixed the example's size somewhere), ``{}`` when all work.

    The other size is the example's minus one (plus one when it is 1), applied to every input axis with that
    dim name; inputs are prefixes of the example (or repeats), so token ids stay valid.
    """
    from qatsparse.export.runners import ort_session

    session = ort_session(path, cuda=False)
    names = [i.name for i in session.get_inputs()]
    problems: dict[str, str] = {}
    dims = sorted({d for a in axes.values() for d in a.values() if d != BATCH})
    for dim in dims:
        feed = {}
        for name, t in zip(names, inputs):
            t = t.detach().cpu()
            for axis, d in axes.get(name, {}).items():
                if d == dim:
                    n = t.shape[axis]
                    t = _resized(t, axis, n - 1 if n > 1 else n + 1)
            feed[name] = t.numpy()
        try:
            out = session.run(None, feed)
            if not all(np.all(np.isfinite(o)) for o in out if np.issubdtype(np.asarray(o).dtype, np.floating)):
                problems[dim] = "ONNX Runtime returned non-finite outputs at another size"
        except Exception as e:  # any failure means the graph does not take that size
            problems[dim] = f"ONNX Runtime failed at another size: {str(e).splitlines()[0][:300]}"
    return problems
