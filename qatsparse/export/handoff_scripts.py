"""The commands and scripts of the TensorRT hand-off bundle: trtexec's build command, Polygraphy's check command
with tolerances from the measured agreement, and ``build.sh``/``check.sh``/``load_inputs.py`` around them."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qatsparse.export.documented_flags import TENSORRT_RANGE, flag_name
from qatsparse.export.profile import Shape3, shape_spec


def trtexec_args(
    onnx: str,
    shapes: Mapping[str, Shape3],
    sparse: bool,
    workspace_gb: float,
    plan: str = "model.plan",
    timing_cache: str = "timing.cache",
    layer_info: str = "layer_info.json",
) -> list[str]:
    """The trtexec arguments of build.sh (without the typing flag, which depends on the release found).

    Example:
        >>> trtexec_args("m.onnx", {"x": ((1, 3), (8, 3), (16, 3))}, True, 1.0)[:3]
        ['--onnx=m.onnx', '--saveEngine=model.plan', '--sparsity=enable']
    """
    args = [f"--onnx={onnx}", f"--saveEngine={plan}"]
    if sparse:
        args.append("--sparsity=enable")  # sparse tactics considered for 2:4 weights; TensorRT keeps the faster
    if shapes:
        for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}={shape_spec({n: s[k] for n, s in shapes.items()})}")
    args += [
        f"--memPoolSize=workspace:{max(1, round(workspace_gb * 1024))}",  # MiB: the unit every 10.x/11.x reads
        f"--timingCacheFile={timing_cache}",
        "--profilingVerbosity=detailed",
        f"--exportLayerInfo={layer_info}",
    ]
    return args


@dataclass
class Tolerance:
    """Polygraphy thresholds for one output, and the agreement they were derived from.

    ``atol`` = max(2 x the largest |ONNX Runtime - PyTorch QAT| on the batch, 1 % of the largest |output|);
    ``cosine`` = 1 - max(2 x (1 - their cosine similarity), 1e-4). Two independent implementations of the
    same quantized graph (PyTorch's fake quantization and ONNX Runtime's Q/DQ kernels) differ by rounding
    flips and accumulation order; a third (TensorRT) is allowed twice that, with floors for FP32/FP16-only
    graphs whose two implementations agree almost exactly.

    Example:
        >>> t = Tolerance.from_outputs(np.array([1.0, 2.0]), np.array([1.0, 2.1]))
        >>> round(t.atol, 3), round(t.max_abs_err, 3)
        (0.2, 0.1)
    """

    atol: float
    cosine: float
    max_abs_err: float
    measured_cosine: float

    @classmethod
    def from_outputs(cls, ort: np.ndarray, qat: np.ndarray) -> Tolerance:
        a, b = ort.astype(np.float64).ravel(), qat.astype(np.float64).ravel()
        max_abs = float(np.abs(a - b).max()) if a.size else 0.0
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        cos = float(a @ b / norm) if norm > 0 else 1.0
        scale = float(np.abs(a).max()) if a.size else 0.0
        return cls(
            atol=max(2 * max_abs, 0.01 * scale, 1e-6),
            cosine=1.0 - max(2 * (1.0 - cos), 1e-4),
            max_abs_err=max_abs,
            measured_cosine=cos,
        )


def format_number(x: float) -> str:
    return f"{x:.6g}"


def polygraphy_check_args(
    model: str,
    runner: Sequence[str],
    tolerances: Mapping[str, Tolerance],
    data_loader: str = "load_inputs.py:load_data",
    reference: str = "onnxruntime_outputs.json",
) -> list[str]:
    """``polygraphy run`` arguments comparing ``model`` (run by ``runner`` flags) with saved reference outputs.

    Example:
        >>> polygraphy_check_args("model.plan", ["--model-type", "engine", "--trt"], {})[:4]
        ['run', 'model.plan', '--model-type', 'engine']
    """
    args = ["run", model, *runner, "--data-loader-script", data_loader, "--load-outputs", reference]
    if tolerances:
        args += ["--compare", "simple", "cosine_similarity", "--check-error-stat", "elemwise"]
        args += ["--atol", *(f"{n}:{format_number(t.atol)}" for n, t in tolerances.items())]
        args += ["--rtol", *(f"{n}:0" for n in tolerances)]  # elemwise fails where |diff| > atol and > rtol*|ref|
        args += ["--cosine-similarity-threshold", *(f"{n}:{format_number(t.cosine)}" for n, t in tolerances.items())]
    return args


# ------------------------------------------------------------------------------------------ scripts
def _lines(args: Sequence[str], indent: str = "  ") -> str:
    """One line per flag with its values, joined by line continuations."""
    groups: list[list[str]] = []
    for a in args:
        if flag_name(a) is not None or not groups:
            groups.append([a])
        else:
            groups[-1].append(a)
    return " \\\n".join(indent + " ".join(shlex.quote(a) for a in g) for g in groups)


def _script_start(header: Sequence[str]) -> str:
    """A bash script's first lines: the shebang, ``header`` as comments, strict mode, ``cd`` to its folder."""
    comments = "\n".join(f"# {h}" if h else "#" for h in header)
    return f"""#!/usr/bin/env bash
{comments}
set -euo pipefail
cd "$(dirname "$0")"
"""


def build_script(args: Sequence[str], header: Sequence[str]) -> str:
    """build.sh: find the TensorRT release of ``$TRTEXEC`` (default ``trtexec``), add ``--stronglyTyped`` on
    10.x (11.x is always strongly typed; the flag is a deprecated no-op there), run it, keep the log."""
    body = f"""TRTEXEC="${{TRTEXEC:-trtexec}}"
# trtexec prints "[TensorRT v<major*10000 + minor*100 + patch>]" on start.
version=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\\[TensorRT v\\([0-9]*\\)\\].*/\\1/p' | head -n 1 || true)
major=$(( ${{version:-0}} / 10000 ))
typing="--stronglyTyped"
if [ -z "$version" ]; then
  echo "build.sh: could not read the TensorRT version of $TRTEXEC; assuming 10.x" >&2
elif [ "$major" -lt 10 ]; then
  echo "build.sh: needs TensorRT {TENSORRT_RANGE[0]}-{TENSORRT_RANGE[1]}; $TRTEXEC is TensorRT $version" >&2
  exit 1
elif [ "$major" -ge 11 ]; then
  typing=""  # strongly typed always; --stronglyTyped is a deprecated no-op in 11.x
fi
"$TRTEXEC" $typing \\
{_lines(args)} \\
  2>&1 | tee build.log
echo "engine: $(pwd)/model.plan (layer information: layer_info.json, log: build.log)"
"""
    return _script_start(header) + body


def check_script(args: Sequence[str], header: Sequence[str]) -> str:
    """check.sh: run ``$POLYGRAPHY`` (default ``polygraphy``) with ``args``."""
    body = f"""POLYGRAPHY="${{POLYGRAPHY:-polygraphy}}"
"$POLYGRAPHY" \\
{_lines(args)}
"""
    return _script_start(header) + body


LOAD_INPUTS = '''"""Polygraphy data loader of check.sh: the validation batch in inputs.npz, one iteration."""

from pathlib import Path

import numpy as np


def load_data():
    with np.load(Path(__file__).with_name("inputs.npz")) as data:
        yield {name: data[name] for name in data.files}
'''
