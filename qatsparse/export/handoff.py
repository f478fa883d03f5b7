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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qatsparse.export.documented_flags import (
    POLYGRAPHY_VERSION,
    TENSORRT_RANGE,
    TOOL_FLAGS_PATH,
    command_lines,
    flag_name,
    tool_flags,
    trtexec_flags,
    undocumented_flags,
)
from qatsparse.export.handoff_scripts import (
    LOAD_INPUTS,
    Tolerance,
    build_script,
    check_script,
    format_number,
    polygraphy_check_args,
    trtexec_args,
)
from qatsparse.export.profile import Shape3

__all__ = [
    "BUNDLE_DIR",
    "LOAD_INPUTS",
    "POLYGRAPHY_VERSION",
    "TENSORRT_RANGE",
    "TOOL_FLAGS_PATH",
    "Bundle",
    "Tolerance",
    "build_script",
    "check_script",
    "command_lines",
    "flag_name",
    "polygraphy_check_args",
    "tool_flags",
    "trtexec_args",
    "trtexec_flags",
    "undocumented_flags",
    "write_bundle",
]

BUNDLE_DIR = "tensorrt"


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
    from qatsparse.export.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def _save_polygraphy_outputs(path: Path, outputs: Mapping[str, np.ndarray], runner_name: str) -> Path:
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    from qatsparse.export.atomic import atomic_path

    results = RunResults()
    results.append((runner_name, [IterationResult(outputs=dict(outputs), runner_name=runner_name)]))
    with atomic_path(path) as tmp, G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # no "Saving inference results" line
        results.save(str(tmp))
    return path


def _write_text(path: Path, text: str, executable: bool = False) -> Path:
    from qatsparse.export.atomic import atomic_path

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
        f"  {n}: max |ORT - QAT| {format_number(t.max_abs_err)}, cosine {format_number(t.measured_cosine)} "
        f"-> atol {format_number(t.atol)}, cosine >= {format_number(t.cosine)}"
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
