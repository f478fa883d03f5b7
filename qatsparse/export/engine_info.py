"""What TensorRT reports about an engine, parsed: the build log's sparsity lines and the inspector's layer JSON.

Pure functions, tested without TensorRT on samples shaped like each version's output. They read what
``build_engine`` captures in-process and what ``trtexec`` writes on the target machine
(``--exportLayerInfo`` is the same inspector JSON; its console log carries the same sparsity lines).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_ELIGIBLE = re.compile(r"Layers eligible for sparse math:\s*(.*)$")
_PICKED = re.compile(r"picked sparse implementation for layers:\s*(.*)$")


def _split_layers(text: str) -> list[str]:
    return [s.strip() for s in text.strip().split(", ") if s.strip()]


def parse_sparsity_log(lines: Iterable[str]) -> dict[str, list[str]]:
    """The layer lists of TensorRT's two sparsity log lines (any prefix, several lines are merged).

    ``(Sparsity) Layers eligible for sparse math: a, b`` lists layers whose weights are 2:4;
    ``(Sparsity) TRT inference plan picked sparse implementation for layers: b`` lists those for which
    the sparse kernel was faster and kept -- eligible is not picked.

    Example:
        >>> parse_sparsity_log(["[I] (Sparsity) Layers eligible for sparse math: conv1, conv2",
        ...                     "[I] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2"])
        {'eligible': ['conv1', 'conv2'], 'picked': ['conv2']}
    """
    out: dict[str, list[str]] = {"eligible": [], "picked": []}
    for line in lines:
        for key, rx in (("eligible", _ELIGIBLE), ("picked", _PICKED)):
            m = rx.search(line.rstrip())
            if m:
                out[key] += [n for n in _split_layers(m.group(1)) if n not in out[key]]
    return out


_DTYPES = (  # order matters: the first match wins ("FP16" before "Float", "Int8" before "Int")
    ("int8", re.compile(r"\bint8\b", re.I)),
    ("fp16", re.compile(r"\b(fp16|half|float16)\b", re.I)),
    ("bf16", re.compile(r"\b(bf16|bfloat16)\b", re.I)),
    ("fp8", re.compile(r"\b(fp8|e4m3)\b", re.I)),
    ("fp4", re.compile(r"\b(fp4|e2m1)\b", re.I)),
    ("int4", re.compile(r"\bint4\b", re.I)),
    ("int32", re.compile(r"\bint32\b", re.I)),
    ("int64", re.compile(r"\bint64\b", re.I)),
    ("bool", re.compile(r"\bbool\b", re.I)),
    ("uint8", re.compile(r"\buint8\b", re.I)),
    ("fp32", re.compile(r"\b(fp32|float|float32)\b", re.I)),
)


def normalize_dtype(text: str | None) -> str:
    """TensorRT's data type spellings (``"Row major linear FP32"``, ``"Half"``, ``"Int8"``, ``"kHALF"``) -> a
    short name (``fp32``, ``fp16``, ``int8``, ...), ``"unknown"`` when none is recognised.

    Example:
        >>> normalize_dtype("Thirty-two wide channel vectorized row major Int8 format"), normalize_dtype("Half")
        ('int8', 'fp16')
    """
    if not text:
        return "unknown"
    t = str(text).replace("kHALF", "Half").replace("kFLOAT", "Float").replace("kINT8", "Int8")
    for name, rx in _DTYPES:
        if rx.search(t):
            return name
    return "unknown"


def _tensor_dtype(t: Any) -> str:
    """Data type of one tensor entry: 10.x ``"Format/Datatype"``, 11.x ``"Datatype"``/``"DataType"``."""
    if not isinstance(t, Mapping):
        return normalize_dtype(str(t))
    for key in ("Datatype", "DataType", "Format/Datatype"):
        if key in t:
            return normalize_dtype(str(t[key]))
    return "unknown"


def parse_engine_information(info: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer precision and weights from ``IEngineInspector.get_engine_information(JSON)`` (or the file
    trtexec writes with ``--exportLayerInfo``).

    Handles both layouts: 10.x gives each tensor a combined ``"Format/Datatype"`` string and lists the
    I/O names under ``"Bindings"``; 11.x gives separate ``"Datatype"`` and ``"Format"`` keys and an
    ``"I/O Tensors"`` list of objects. Without ``ProfilingVerbosity.DETAILED`` layers are bare names.

    A layer's precision is ``int8`` when any of its inputs or weights are INT8 (TensorRT ran an INT8
    kernel), else the type of its first output. ``sparse_weight_layers`` are the layers with
    ``"HasSparseWeights": 1`` -- weights that qualify for sparse kernels, which is *not* saying that a
    sparse kernel was picked (TensorRT times both and keeps the faster; the build log's "picked" line says
    which, see :func:`parse_sparsity_log`).

    Example:
        >>> r = parse_engine_information({"Layers": [{"Name": "conv", "LayerType": "CaskConvolution",
        ...     "Inputs": [{"Name": "x", "Format/Datatype": "Int8"}], "Outputs": [{"Name": "y",
        ...     "Format/Datatype": "Half"}], "HasSparseWeights": 1}], "Bindings": ["x", "y"]})
        >>> r["schema"], r["layers"][0]["precision"], r["sparse_weight_layers"]
        ('10.x', 'int8', ['conv'])
    """
    data = json.loads(info) if isinstance(info, (str, bytes)) else dict(info)
    if "I/O Tensors" in data:
        schema = "11.x"
        io = [
            {
                "name": t.get("Name") if isinstance(t, Mapping) else str(t),
                "mode": t.get("IOMode", t.get("Mode")) if isinstance(t, Mapping) else None,
                "dtype": _tensor_dtype(t),
            }
            for t in data["I/O Tensors"]
        ]
    elif "Bindings" in data:
        schema = "10.x"
        io = [{"name": str(b), "mode": None, "dtype": "unknown"} for b in data["Bindings"]]
    else:
        schema, io = "unknown", []
    layers = []
    for layer in data.get("Layers", []):
        if not isinstance(layer, Mapping):  # names only (ProfilingVerbosity below DETAILED)
            layers.append({"name": str(layer), "type": None, "precision": "unknown", "sparse_weights": None})
            continue
        ins = [_tensor_dtype(t) for t in layer.get("Inputs", [])]
        outs = [_tensor_dtype(t) for t in layer.get("Outputs", [])]
        weights = layer.get("Weights")
        wtype = normalize_dtype(weights.get("Type")) if isinstance(weights, Mapping) else None
        first = outs[0] if outs else (ins[0] if ins else "unknown")
        precision = "int8" if "int8" in ins or wtype == "int8" else first
        sparse = layer.get("HasSparseWeights")
        layers.append(
            {
                "name": str(layer.get("Name", "")),
                "type": layer.get("LayerType"),
                "inputs": ins,
                "outputs": outs,
                "weights": wtype,
                "precision": precision,
                "sparse_weights": None if sparse is None else bool(int(sparse)),
                "tactic": layer.get("TacticName"),
            }
        )
    if schema == "unknown" and layers and any(isinstance(x, Mapping) for x in data.get("Layers", [])):
        schema = "11.x" if any("Datatype" in str(x) or "DataType" in str(x) for x in data["Layers"]) else "10.x"
    counts = Counter(layer["precision"] for layer in layers)
    return {
        "schema": schema,
        "io_tensors": io,
        "layers": layers,
        "precision_counts": dict(counts),
        "sparse_weight_layers": [layer["name"] for layer in layers if layer.get("sparse_weights")],
    }


def engine_sparsity(log_lines: Iterable[str] | None, inspection: Mapping[str, Any] | None) -> dict[str, Any]:
    """Which layers run sparse kernels, from what is known: the build log's ``picked`` list is the answer;
    its ``eligible`` list and the inspector's ``HasSparseWeights`` layers only say the weights qualify.

    ``log_lines`` None means the build log was not seen (e.g. another ``trt.ILogger`` was registered first in
    the process): ``picked`` is then None -- unknown, not empty.

    Example:
        >>> engine_sparsity(None, {"sparse_weight_layers": ["conv"]})["picked"] is None
        True
    """
    parsed = parse_sparsity_log(log_lines) if log_lines is not None else None
    return {
        "picked": parsed["picked"] if parsed is not None else None,
        "eligible": parsed["eligible"] if parsed is not None else None,
        "weights_qualify": list((inspection or {}).get("sparse_weight_layers", [])),
        "source": "build log" if parsed is not None else "build log not seen: picked layers unknown",
    }


def engine_precision_label(inspection: Mapping[str, Any] | None) -> str:
    """``"engine: int8 x12, fp16 x5"``: the most common layer precisions of an engine (``"engine"`` if unknown).

    Example:
        >>> engine_precision_label({"precision_counts": {"int8": 12, "fp16": 5, "unknown": 1}})
        'engine: int8 x12, fp16 x5'
    """
    counts = (inspection or {}).get("precision_counts") or {}
    main = sorted(((v, k) for k, v in counts.items() if k != "unknown"), reverse=True)
    return "engine: " + ", ".join(f"{k} x{v}" for v, k in main[:3]) if main else "engine"


def trtexec_build_facts(folder: str | Path) -> dict[str, Any] | None:
    """Build facts of an engine that ``build.sh`` (trtexec) made in ``folder``: the layer information it exported
    (``layer_info.json``) and the sparsity lines of its log (``build.log``). None when neither exists.

    Example:
        >>> import tempfile; trtexec_build_facts(tempfile.mkdtemp()) is None
        True
    """
    folder = Path(folder)
    info, log = folder / "layer_info.json", folder / "build.log"
    if not info.is_file() and not log.is_file():
        return None
    inspection = parse_engine_information(info.read_text()) if info.is_file() else None
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else None
    return {
        "built_by": "trtexec (build.sh)",
        "inspector": inspection,
        "sparsity": engine_sparsity(lines, inspection),
        "layer_info": str(info) if info.is_file() else None,
        "build_log": str(log) if log.is_file() else None,
    }
