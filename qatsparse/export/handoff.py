"""The TensorRT hand-off bundle: what the target machine needs to build the engine and check it.

TensorRT is usually installed only where the model is deployed, so every export writes ``dirpath/tensorrt/``:

* ``build.sh`` -- the trtexec command for this model: strongly typed on 10.x (always on in 11.x),
  ``--sparsity=enable`` when layers were pruned, min/opt/max shapes from the graph's dynamic dims, a timing
  cache, the layer information exported with detailed profiling verbosity, the log kept in ``build.log``;
* ``check.sh`` -- a Polygraphy command comparing the built engine with ONNX Runtime on ``inputs.npz``, with
  tolerances derived from the agreement measured at export (``load_inputs.py`` feeds it the batch);
* ``inputs.npz`` -- a real validation batch, keyed by the graph's input names;
* ``outputs_pytorch_qat.npz``, ``outputs_onnxruntime.npz`` -- the two models' outputs for it (by output name),
  and ``onnxruntime_outputs.json``, the latter in Polygraphy's format (what ``check.sh`` compares with);
* ``README.md`` -- the three steps on a TensorRT machine, with this run's paths.

Every flag the scripts use is checked, when they are written, against :data:`TOOL_FLAGS_PATH` -- the flags
trtexec documents at each TensorRT release tag from 10.0 to 11.1 and those ``polygraphy run`` (0.53.6) lists,
with their sources (``scripts/tool_flags.py`` regenerates it).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qatsparse.export.profile import Shape3, shape_spec

#: The flags trtexec and ``polygraphy run`` document, per release, with their sources.
TOOL_FLAGS_PATH = Path(__file__).with_name("tool_flags.json")
#: The TensorRT releases build.sh targets (first, last), as in :data:`qatsparse.export.tensorrt.SUPPORTED_TENSORRT`.
TENSORRT_RANGE = ("10.0", "11.1")
#: The Polygraphy release check.sh is written for (its flags are checked against this release's parser).
POLYGRAPHY_VERSION = "0.53"
BUNDLE_DIR = "tensorrt"


@functools.cache
def tool_flags() -> dict[str, Any]:
    """The contents of :data:`TOOL_FLAGS_PATH`."""
    return json.loads(TOOL_FLAGS_PATH.read_text())


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def trtexec_flags(major: int | None = None) -> dict[str, set[str]]:
    """{release: documented trtexec flags} for the releases in :data:`TENSORRT_RANGE` (one major if given).

    Example:
        >>> "--stronglyTyped" in trtexec_flags(10)["10.0.0"]
        True
    """
    lo, hi = (_version(v) for v in TENSORRT_RANGE)
    out = {}
    for v, entry in tool_flags()["trtexec"]["versions"].items():
        key = _version(v)
        if lo <= key[:2] <= hi and (major is None or key[0] == major):
            out[v] = set(entry["flags"])
    return out


def flag_name(arg: str) -> str | None:
    """The flag of a command-line word (``--sparsity=enable`` -> ``--sparsity``), None for a value.

    Example:
        >>> flag_name("--minShapes=input:1x3"), flag_name("engine")
        ('--minShapes', None)
    """
    return arg.split("=", 1)[0] if arg.startswith("-") and not _is_number(arg) else None


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def undocumented_flags(args: Sequence[str], documented: set[str]) -> list[str]:
    """The flags of ``args`` that ``documented`` does not list.

    Example:
        >>> undocumented_flags(["--onnx=m.onnx", "--fast"], {"--onnx"})
        ['--fast']
    """
    return [f for a in args if (f := flag_name(a)) is not None and f not in documented]


# ------------------------------------------------------------------------------------------ commands
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


def _fmt(x: float) -> str:
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
        args += ["--atol", *(f"{n}:{_fmt(t.atol)}" for n, t in tolerances.items())]
        args += ["--rtol", *(f"{n}:0" for n in tolerances)]  # elemwise fails where |diff| > atol and > rtol*|ref|
        args += ["--cosine-similarity-threshold", *(f"{n}:{_fmt(t.cosine)}" for n, t in tolerances.items())]
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


def build_script(args: Sequence[str], header: Sequence[str]) -> str:
    """build.sh: find the TensorRT release of ``$TRTEXEC`` (default ``trtexec``), add ``--stronglyTyped`` on
    10.x (11.x is always strongly typed; the flag is a deprecated no-op there), run it, keep the log."""
    comments = "\n".join(f"# {h}" if h else "#" for h in header)
    return f"""#!/usr/bin/env bash
{comments}
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-trtexec}}"
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


def check_script(args: Sequence[str], header: Sequence[str]) -> str:
    """check.sh: run ``$POLYGRAPHY`` (default ``polygraphy``) with ``args``."""
    comments = "\n".join(f"# {h}" if h else "#" for h in header)
    return f"""#!/usr/bin/env bash
{comments}
set -euo pipefail
cd "$(dirname "$0")"
POLYGRAPHY="${{POLYGRAPHY:-polygraphy}}"
"$POLYGRAPHY" \\
{_lines(args)}
"""


LOAD_INPUTS = '''"""Polygraphy data loader of check.sh: the validation batch in inputs.npz, one iteration."""

from pathlib import Path

import numpy as np


def load_data():
    with np.load(Path(__file__).with_name("inputs.npz")) as data:
        yield {name: data[name] for name in data.files}
'''


def command_lines(script: str, program: str) -> list[list[str]]:
    """The commands of a bundle script that run ``program`` (``"$TRTEXEC"``, ``"$POLYGRAPHY"``), each split with
    :func:`shlex.split` after joining continued lines (what the tests check flag by flag).

    Example:
        >>> command_lines('x=1\\n"$T" --a \\\\\\n  --b=2 2>&1 | tee log\\n', '"$T"')
        [['--a', '--b=2']]
    """
    joined = script.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.lstrip().startswith(program):
            words = shlex.split(line.lstrip()[len(program) :], comments=True)
            words = words[: words.index("|")] if "|" in words else words
            out.append([w for w in words if not re.fullmatch(r"\d*[<>]&?\d*", w)])  # drop redirections
    return out


# ------------------------------------------------------------------------------------------ the bundle
@dataclass
class Bundle:
    """What :func:`write_bundle` wrote: the files, the shapes and tolerances it used, notes.

    Example:
        >>> Bundle(Path("export/tensorrt")).files
        {}
    """

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, Shape3] = field(default_factory=dict)
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The report's ``tensorrt_bundle`` entry."""
        return {
            "folder": str(self.folder),
            "files": {k: str(v) for k, v in self.files.items()},
            "profile": {n: [list(s) for s in v] for n, v in self.shapes.items()},
            "tolerances": {n: vars(t) for n, t in self.tolerances.items()},
            "targets": {"tensorrt": list(TENSORRT_RANGE), "polygraphy": POLYGRAPHY_VERSION},
            "notes": self.notes,
        }


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    from qatsparse.export.onnx import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def _save_polygraphy_outputs(path: Path, outputs: Mapping[str, np.ndarray], runner_name: str) -> Path:
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    from qatsparse.export.onnx import atomic_path

    results = RunResults()
    results.append((runner_name, [IterationResult(outputs=dict(outputs), runner_name=runner_name)]))
    with atomic_path(path) as tmp, G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # no "Saving inference results" line
        results.save(str(tmp))
    return path


def _write_text(path: Path, text: str, executable: bool = False) -> Path:
    from qatsparse.export.onnx import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | 0o111)
    return path


def write_bundle(
    folder: str | Path,
    onnx_path: str | Path,
    inputs: Sequence[torch.Tensor],
    qat_runner: Any,
    ort_runner: Any,
    shapes: Mapping[str, Shape3],
    sparse_layers: Sequence[str] = (),
    precision: str = "",
    workspace_gb: float = 4.0,
    validate_command: str | None = None,
) -> Bundle:
    """Write the hand-off bundle for ``onnx_path`` into ``folder`` (see the module docstring).

    Args:
        folder: the bundle folder (``dirpath/tensorrt``); ``onnx_path`` is referenced relative to it.
        onnx_path: the deployable graph.
        inputs: one real validation batch (its inputs), already cut to the profile's batch range.
        qat_runner: the PyTorch model as exported (the QAT model), a :class:`~qatsparse.export.runners.Runner`.
        ort_runner: an :class:`~qatsparse.export.runners.OnnxRuntimeRunner` on ``onnx_path``.
        shapes: the optimization profile, per input (see :func:`qatsparse.export.profile.profile_shapes`).
        sparse_layers: the 2:4 layers (``--sparsity=enable`` when any).
        precision: what the graph computes in, for the header (e.g. ``int8+fp16``).
        workspace_gb: the builder's workspace limit.
        validate_command: the ``qatsparse validate`` command of step 3 in README.md.

    Raises:
        RuntimeError: a command would use a flag the targeted trtexec/Polygraphy releases do not document.
    """
    import os

    from qatsparse._version import __version__
    from qatsparse.export.runners import as_ort_input

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_rel = os.path.relpath(Path(onnx_path).resolve(), folder.resolve())
    bundle = Bundle(folder, shapes=dict(shapes))
    in_specs = ort_runner.session.get_inputs()
    out_names = [o.name for o in ort_runner.session.get_outputs()]
    feed = {s.name: as_ort_input(t, s.type) for s, t in zip(in_specs, inputs)}
    ort_out = ort_runner(tuple(torch.from_numpy(a) for a in feed.values()))
    qat_out = qat_runner(tuple(torch.from_numpy(a) for a in feed.values()))
    ort_np = {n: o.numpy() for n, o in zip(out_names, ort_out)}
    qat_np = {n: o.numpy() for n, o in zip(out_names, qat_out)}
    bundle.tolerances = {n: Tolerance.from_outputs(ort_np[n], qat_np[n]) for n in out_names}

    b = bundle.files
    b["inputs.npz"] = _save_npz(folder / "inputs.npz", feed)
    b["outputs_pytorch_qat.npz"] = _save_npz(folder / "outputs_pytorch_qat.npz", qat_np)
    b["outputs_onnxruntime.npz"] = _save_npz(folder / "outputs_onnxruntime.npz", ort_np)
    b["onnxruntime_outputs.json"] = _save_polygraphy_outputs(folder / "onnxruntime_outputs.json", ort_np, "onnxruntime")
    b["load_inputs.py"] = _write_text(folder / "load_inputs.py", LOAD_INPUTS)

    made = f"Written by qatsparse {__version__} on {_dt.date.today().isoformat()} for {onnx_rel}."
    build = trtexec_args(onnx_rel, shapes, bool(sparse_layers), workspace_gb)
    for release, documented in trtexec_flags().items():
        bad = undocumented_flags([*build, "--stronglyTyped"], documented)
        if bad:
            raise RuntimeError(f"build.sh would use {bad}, which trtexec {release} does not document")
    profile = [f"  {n}: min {'x'.join(map(str, s[0]))}, opt {'x'.join(map(str, s[1]))}, max "
               f"{'x'.join(map(str, s[2]))}" for n, s in shapes.items()]  # fmt: skip
    b["build.sh"] = _write_text(
        folder / "build.sh",
        build_script(
            build,
            [
                "Build the TensorRT engine (model.plan) on the machine it will run on, with trtexec.",
                f"Targets TensorRT {TENSORRT_RANGE[0]}-{TENSORRT_RANGE[1]}: every flag below is documented by trtexec "
                "at each of those releases",
                "(qatsparse/export/tool_flags.json, from NVIDIA/TensorRT samples/common/sampleOptions.cpp per tag).",
                made,
                "",
                f"precision: {precision or 'as in the graph'} -- strongly typed: TensorRT runs each layer in the "
                "type the graph gives it",
                f"2:4 sparsity: {len(sparse_layers)} pruned layer(s)"
                + (" -> --sparsity=enable (TensorRT times sparse kernels, keeps the faster)" if sparse_layers else ""),
                "optimization profile (from the graph's dynamic dims):",
                *profile,
                "Writes here: model.plan, timing.cache (reused by later builds here), layer_info.json, build.log.",
                "Usage: bash build.sh   (TRTEXEC=/path/to/trtexec bash build.sh for another trtexec)",
            ],
        ),
        executable=True,
    )

    check = polygraphy_check_args("model.plan", ["--model-type", "engine", "--trt"], bundle.tolerances)
    documented = set(tool_flags()["polygraphy_run"]["flags"])
    bad = undocumented_flags(check, documented)
    if bad:
        raise RuntimeError(f"check.sh would use {bad}, which polygraphy run {POLYGRAPHY_VERSION} does not document")
    measured = [
        f"  {n}: max |ORT - QAT| {_fmt(t.max_abs_err)}, cosine {_fmt(t.measured_cosine)} -> atol {_fmt(t.atol)}, "
        f"cosine >= {_fmt(t.cosine)}"
        for n, t in bundle.tolerances.items()
    ]
    b["check.sh"] = _write_text(
        folder / "check.sh",
        check_script(
            check,
            [
                "Compare the engine built by build.sh with ONNX Runtime on a real validation batch, with Polygraphy.",
                f"Written for Polygraphy {POLYGRAPHY_VERSION} (flags checked against `polygraphy run` "
                f"{tool_flags()['polygraphy_run']['version']}). {made}",
                "Inputs: inputs.npz (read by load_inputs.py). Reference: onnxruntime_outputs.json = ONNX Runtime's "
                "outputs of the graph for them.",
                "Tolerances, from the agreement of ONNX Runtime and the PyTorch QAT model on this batch (2x the "
                "measured error, floor 1 % of |output|):",
                *measured,
                "Usage: bash check.sh   (after build.sh; POLYGRAPHY=/path/to/polygraphy bash check.sh for another)",
            ],
        ),
        executable=True,
    )
    b["README.md"] = _write_text(folder / "README.md", _readme(onnx_rel, validate_command))
    return bundle


def _readme(onnx_rel: str, validate_command: str | None) -> str:
    step3 = validate_command or (
        "qatsparse validate --config <your run's config> --ckpt_path <its checkpoint> --engine tensorrt/model.plan"
    )
    return f"""# TensorRT hand-off

Built from `{onnx_rel}`. On a machine with TensorRT {TENSORRT_RANGE[0]}-{TENSORRT_RANGE[1]} (trtexec on `PATH`),
Polygraphy {POLYGRAPHY_VERSION} and this project installed:

1. `bash build.sh` -- builds `model.plan` here with trtexec (log in `build.log`, layer details in `layer_info.json`).
2. `bash check.sh` -- Polygraphy compares the engine with ONNX Runtime's outputs on `inputs.npz`.
3. `{step3}`
   -- re-validates the engine on the whole validation set: the same report, with a `tensorrt` row.

Files: `inputs.npz` (a validation batch), `outputs_pytorch_qat.npz` and `outputs_onnxruntime.npz` (the two
models' outputs for it), `onnxruntime_outputs.json` (the same in Polygraphy's format), `load_inputs.py` (check.sh's
data loader).
"""
