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


def resume_command(trainer: Any, checkpoint: Path) -> str:
    """The ``qatsparse export`` command that finishes an export from ``checkpoint``."""
    config = cli_config_path(trainer)
    cfg = shlex.quote(str(config)) if config else "<your recipe>"
    return f"qatsparse export --config {cfg} --ckpt_path {shlex.quote(str(checkpoint))}"


def resume_hint(trainer: Any, checkpoint: Path, dirpath: Path) -> str:
    """How to finish the export, from the command line and from Python."""
    return (
        f"The trained model is saved in {checkpoint}. Fix the cause, then finish the export with\n"
        f"  {resume_command(trainer, checkpoint)}\n"
        f"or in Python: TensorRTExport(dirpath={str(dirpath)!r}, ...).export_checkpoint(YourModel, "
        f"{str(checkpoint)!r}, val_dataloader)"
    )


def write_partial_report(
    dirpath: str | Path, completed: Sequence[str], error: BaseException, checkpoint: Path, resume: str
) -> Path:
    """Write ``report.json`` for an export that stopped: what completed (and the files it wrote), the stage
    that failed with its error, the checkpoint and the command that finishes it; ``passed`` is false. A
    ``report.md``/``report.png`` of an earlier run is removed, so nothing in ``dirpath`` describes a run
    that did not happen."""
    from qatsparse.export.onnx import atomic_path
    from qatsparse.report import json_safe, library_versions

    d = Path(dirpath)
    failed = next((s for s in STAGES if s not in completed), None)
    artifacts = {name: str(d / name) for stage in completed for name in STAGES.get(stage, ()) if (d / name).is_file()}
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
