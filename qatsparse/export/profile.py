"""TensorRT optimization-profile shapes (min, opt, max) for every input of an exported graph.

The dynamic dims are read off the ONNX graph itself (its ``dim_param`` names), so the profile follows
whatever the export declared: the batch axis (named :data:`BATCH_DIM`) spans ``batch_sizes``; any other
named dim spans the range given for it in ``dim_ranges``, or -- when none is given -- stays at the size
it has in the example inputs (and the profile says so). ``build_engine`` and the hand-off ``build.sh`` use
the same function, so the in-process build and trtexec build the same profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

#: The ``dim_param`` of the batch axis in qatsparse's exports.
BATCH_DIM = "batch"
Dim = int | str
Shape3 = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def onnx_input_dims(path: str | Path) -> dict[str, tuple[Dim, ...]]:
    """The graph inputs (initializers excluded) and their dims: an int for a static dim, the ``dim_param``
    name for a dynamic one (``"?"`` when it has none).

    Example:
        >>> import tempfile, torch
        >>> from qatsparse.export.onnx import export_onnx
        >>> p = export_onnx(torch.nn.Linear(3, 2), [torch.zeros(1, 3)], tempfile.mkdtemp() + "/m.onnx")
        >>> onnx_input_dims(p)
        {'input': ('batch', 3)}
    """
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    out: dict[str, tuple[Dim, ...]] = {}
    for i in g.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        out[i.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
    return out


def _check_range(what: str, r: Sequence[int]) -> tuple[int, int, int]:
    t = tuple(int(v) for v in r)
    if len(t) != 3 or not 1 <= t[0] <= t[1] <= t[2]:
        raise ValueError(f"{what} must be (min, opt, max) with 1 <= min <= opt <= max, got {tuple(r)}")
    return t  # type: ignore[return-value]


def profile_shapes(
    input_dims: Mapping[str, Sequence[Dim]],
    batch_sizes: Sequence[int],
    dim_ranges: Mapping[str, Sequence[int]] | None = None,
    example_shapes: Mapping[str, Sequence[int]] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Shape3]:
    """(min, opt, max) shape of every input.

    Args:
        input_dims: per input, its dims as :func:`onnx_input_dims` gives them (ints, ``dim_param`` names;
            ``-1`` or ``"?"`` for an unnamed dynamic dim, which is the batch axis only at axis 0).
        batch_sizes: (min, opt, max) of the batch axis.
        dim_ranges: (min, opt, max) per other dynamic dim name (e.g. ``{"seq": (1, 128, 512)}``).
        example_shapes: per input, the shape of an example batch: a dynamic dim without a range is fixed
            at its example size (and a note says so).
        notes: where such fallbacks are recorded.

    Raises:
        ValueError: a range that is not (min, opt, max) ordered, or a dynamic dim with neither a range
            nor an example size.

    Example:
        >>> profile_shapes({"planes": ("batch", 18, 8, 8)}, (1, 32, 256))["planes"][2]
        (256, 18, 8, 8)
        >>> profile_shapes({"ids": ("batch", "seq")}, (1, 8, 16), {"seq": (1, 64, 128)})["ids"]
        ((1, 1), (8, 64), (16, 128))
    """
    bs = _check_range("batch_sizes", batch_sizes)
    ranges = {k: _check_range(f"the range of dim {k!r}", v) for k, v in (dim_ranges or {}).items()}
    out: dict[str, Shape3] = {}
    for name, dims in input_dims.items():
        lo, opt, hi = [], [], []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d >= 0:
                r = (d, d, d)
            elif d == BATCH_DIM or (axis == 0 and d in (-1, "?")):
                r = bs
            elif isinstance(d, str) and d in ranges:
                r = ranges[d]
            elif example_shapes is not None and name in example_shapes and axis < len(example_shapes[name]):
                v = int(example_shapes[name][axis])
                r = (v, v, v)
                if notes is not None:
                    notes.append(
                        f"input {name!r} axis {axis} ({d}) is dynamic but has no range: profile fixed at the "
                        f"example's size {v}"
                    )
            else:
                label = d if isinstance(d, str) and d != "?" else f"axis {axis}"
                raise ValueError(
                    f"input {name!r} has a dynamic dim {label!r} (shape {tuple(dims)}) without a range: give "
                    f"dim_ranges={{{label!r}: (min, opt, max)}}"
                )
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        out[name] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def shape_spec(shapes: Mapping[str, Sequence[int]]) -> str:
    """trtexec's shape spec ``name:1x3x224x224,other:1x5`` (names with ``:`` or ``,`` wrapped in single quotes,
    as trtexec's help says; 0-D inputs as ``name:scalar``).

    Example:
        >>> shape_spec({"input": (1, 3, 8, 8), "a:0": (1, 5)})
        "input:1x3x8x8,'a:0':1x5"
    """
    parts = []
    for name, shape in shapes.items():
        key = f"'{name}'" if any(c in name for c in ":,") else name
        parts.append(f"{key}:{'x'.join(str(int(d)) for d in shape) if len(shape) else 'scalar'}")
    return ",".join(parts)
