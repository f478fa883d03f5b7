"""Lose nothing after training: the compressed model reaches ``dirpath`` before the export starts, and an
export that fails leaves a partial ``report.json`` and an error that says how to finish from the checkpoint.

Example:
    >>> resume_command(None, Path("runs/x/model.ckpt"))
    'qatsparse export --config <your recipe> --ckpt_path runs/x/model.ckpt'
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The checkpoint TensorRTExport saves in ``dirpath`` before exporting.
CHECKPOINT_NAME = "model.ckpt"

#: The export's stages in order, and the files each one writes in ``dirpath``.
STAGES: dict[str, tuple[str, ...]] = {
    "checkpoint": (CHECKPOINT_NAME,),
    "export": ("model_fp32.onnx", "model.onnx"),
    "lint": (),
    "handoff": ("tensorrt",),
    "engine": ("model.plan", "build.json"),
    "validation": (),
    "report": ("report.json", "report.md", "report.png"),
}


class ExportFailed(RuntimeError):
    """The export, engine build or validation failed after training; the trained model is in ``dirpath``."""


def save_checkpoint(trainer: Any, dirpath: str | Path) -> Path:
    """Save the Trainer's model, with every callback's state (2:4 masks, quantizer structure and ranges, the
    dense reference), as ``dirpath/model.ckpt``. Written to a temporary name and moved into place, so the
    file is either complete or absent. Every rank must call it (Lightning's save is collective)."""
    dirpath = Path(dirpath)
    final, tmp = dirpath / CHECKPOINT_NAME, dirpath / f".{CHECKPOINT_NAME}.tmp"
    if trainer.is_global_zero:
        dirpath.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(tmp)  # ends with a barrier
    if trainer.is_global_zero:
        os.replace(tmp, final)
    trainer.strategy.barrier("qatsparse.save_checkpoint")
    return final


def cli_config_path(trainer: Any) -> Path | None:
    """The config file LightningCLI saved for this run (``qatsparse fit --config ...``), if any."""
    if trainer is None:
        return None
    for cb in trainer.callbacks:
        if type(cb).__name__ == "SaveConfigCallback" and getattr(cb, "config_filename", None):
            path = Path(trainer.log_dir or ".") / cb.config_filename
            return path if path.is_file() else None
    return None


def resume_command(trainer: Any, checkpoint: Path, subcommand: str = "export") -> str:
    """The ``qatsparse export`` (or ``validate``) command that works on ``checkpoint`` with this run's config."""
    config = cli_config_path(trainer)
    cfg = shlex.quote(str(config)) if config else "<your recipe>"
    return f"qatsparse {subcommand} --config {cfg} --ckpt_path {shlex.quote(str(checkpoint))}"


def resume_hint(trainer: Any, checkpoint: Path, dirpath: Path) -> str:
    """How to finish the export, from the command line and from Python."""
    return (
        f"The trained model is saved in {checkpoint}. Fix the cause, then finish the export with\n"
        f"  {resume_command(trainer, checkpoint)}\n"
        f"or in Python: TensorRTExport(dirpath={str(dirpath)!r}, ...).export_checkpoint(YourModel, "
        f"{str(checkpoint)!r}, val_dataloader)"
    )


def failed_stage(completed: Sequence[str]) -> str:
    """The first stage of :data:`STAGES` not in ``completed``."""
    return next((s for s in STAGES if s not in completed), "report")


def export_failed(
    error: BaseException, trainer: Any, checkpoint: Path, dirpath: str | Path, completed: Sequence[str]
) -> ExportFailed:
    """Write the partial report of an export that raised ``error`` and return the error to raise instead."""
    d = Path(dirpath)
    write_partial_report(d, completed, error, checkpoint, resume_command(trainer, checkpoint))
    return ExportFailed(
        f"qatsparse: the {failed_stage(completed)} step failed after training ({type(error).__name__}: {error}).\n"
        f"{resume_hint(trainer, checkpoint, d)}\n(what completed: {d / 'report.json'})"
    )


def gate_failed(error: BaseException, trainer: Any, checkpoint: Path) -> BaseException:
    """``error`` (a failed accuracy gate) with where the trained model is and how to re-check the artifacts."""
    again = resume_command(trainer, checkpoint, "validate") + " --artifacts true"
    return type(error)(
        f"{error}\nThe trained model is saved in {checkpoint}; to validate the artifacts again (e.g. with another "
        f"max_metric_drop): {again}"
    )


def write_partial_report(
    dirpath: str | Path, completed: Sequence[str], error: BaseException, checkpoint: Path, resume: str
) -> Path:
    """Write ``report.json`` for an export that stopped: what completed (and the files it wrote), the stage
    that failed with its error, the checkpoint and the command that finishes it; ``passed`` is false. A
    ``report.md``/``report.png`` of an earlier run is removed, so nothing in ``dirpath`` describes a run
    that did not happen."""
    from qatsparse.environment import library_versions
    from qatsparse.export.atomic import atomic_path
    from qatsparse.report import json_safe

    d = Path(dirpath)
    failed = failed_stage(completed)
    artifacts = {name: str(d / name) for stage in completed for name in STAGES.get(stage, ()) if (d / name).exists()}
    report = {
        "passed": False,
        "complete": False,
        "completed_stages": list(completed),
        "failed_stage": failed,
        "error": {"type": type(error).__name__, "message": str(error)},
        "checkpoint": str(checkpoint),
        "resume": resume,
        "artifacts": artifacts,
        "versions": library_versions(),
    }
    for stale in ("report.md", "report.png"):
        (d / stale).unlink(missing_ok=True)
    path = d / "report.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(report), indent=2, default=str, allow_nan=False) + "\n")
    return path
