"""Dynamic axes beyond the batch: which input axes may vary, their TensorRT range, and a check that they do.

Every input's axis 0 is the batch (``"batch"``). More axes are declared as ``{input name: {axis: dim name}}``
(``TensorRTExport(dynamic_axes=...)``), or found by convention (``dynamic_axes="auto"``, the default):
an **integer input of rank >= 2** (token ids, attention masks, position ids) gets axis 1 named
``"sequence"``; float inputs (images, features) keep their other axes fixed unless declared (e.g.
``{"input": {2: "height", 3: "width"}}``). Inputs sharing a dim name share its size.

The names are written into the ONNX graph as ``dim_param`` (read back with :func:`dynamic_axes_of`), which
is where the TensorRT build (and anything else building engines from the file) finds them. Each named dim
gets a (min, opt, max) range for TensorRT's optimization profile: ``"batch"`` from ``batch_sizes``, the
others from ``shape_ranges`` or, by default, ``(1, n, n)`` with ``n`` the example's size
(:func:`shape_profile`). After the export, :func:`check_dynamic_axes` runs ONNX Runtime at another size of
each named dim: a graph that fixed the example's size into a reshape fails there, not in deployment.

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


def check_shape_ranges(ranges: Any) -> dict[str, Range]:
    """Validate ``{dim name: (min, opt, max)}`` with ``1 <= min <= opt <= max``."""
    if ranges is None:
        return {}
    if not isinstance(ranges, Mapping):
        raise ValueError(
            f"shape_ranges must be {{dim name: (min, opt, max)}}, e.g. {{'sequence': (1, 128, 512)}}; got {ranges!r}"
        )
    out = {}
    for dim, r in ranges.items():
        vals = tuple(r) if isinstance(r, (list, tuple)) else ()
        if len(vals) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals) or not (
            1 <= vals[0] <= vals[1] <= vals[2]
        ):
            raise ValueError(f"shape_ranges[{dim!r}] must be (min, opt, max) with 1 <= min <= opt <= max, got {r!r}")
        out[str(dim)] = vals  # type: ignore[assignment]
    return out


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
    """``{input name: {axis: dim name}}`` of an ONNX file's symbolic input dims (``dim_param``), the batch included.

    Example:
        >>> import tempfile
        >>> from torch import nn
        >>> from qatsparse.export.onnx import export_onnx
        >>> dynamic_axes_of(export_onnx(nn.Linear(2, 2), [torch.zeros(1, 2)], tempfile.mkdtemp() + "/m.onnx"))
        {'input': {0: 'batch'}}
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    out: dict[str, dict[int, str]] = {}
    for vi in graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        named = {i: d.dim_param for i, d in enumerate(dims) if d.HasField("dim_param") and d.dim_param}
        if named:
            out[vi.name] = named
    return out


def shape_profile(
    input_shapes: Mapping[str, Sequence[int]],
    axes: Mapping[str, Mapping[int, str]],
    batch_sizes: Sequence[int],
    shape_ranges: Mapping[str, Range] | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input for one TensorRT optimization profile.

    ``input_shapes`` are the example's shapes (their sizes are the default opt/max of named dims);
    ``axes`` names the dynamic axes (:func:`dynamic_axes_of`). ``"batch"`` spans ``batch_sizes``; another
    named dim spans ``shape_ranges[name]``, else ``(1, n, n)``.

    Example:
        >>> shape_profile({"ids": (1, 16)}, {"ids": {0: "batch", 1: "sequence"}}, (1, 8, 32), {"sequence": (4, 16, 64)})
        {'ids': ((1, 4), (8, 16), (32, 64))}
    """
    bs = tuple(int(b) for b in batch_sizes)
    if len(bs) != 3 or not 1 <= bs[0] <= bs[1] <= bs[2]:
        raise ValueError(f"batch_sizes must be (min, opt, max) with 1 <= min <= opt <= max, got {tuple(batch_sizes)}")
    ranges = dict(shape_ranges or {})
    out = {}
    for name, shape in input_shapes.items():
        lo, opt, hi = [], [], []
        for axis, size in enumerate(shape):
            dim = axes.get(name, {}).get(axis)
            r = bs if dim == BATCH else ranges.get(dim, (1, int(size), int(size))) if dim else (size, size, size)
            lo.append(int(r[0]))
            opt.append(int(r[1]))
            hi.append(int(r[2]))
        out[name] = (tuple(lo), tuple(opt), tuple(hi))
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
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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
