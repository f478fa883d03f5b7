"""Run one model of the coverage matrix in its own process: a crash, a hang or a memory overrun is a record.

Processes are forked from a forkserver that imported torch, Lightning, qatsparse, timm and transformers
once (``PRELOAD``), so each model starts in well under a second yet shares nothing with the others.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from coverage_zoo import ModelSpec


def _rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return 0.0


def _stopped(pid: int) -> bool:
    """True when the process is stopped (state T/t in /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _stderr_tail(path: Path, n: int = 6) -> list[str]:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []
    return [ln[:300] for ln in lines[-n:]]


_CONTEXT: Any = None
POLL_S = 0.5
#: Imported once by the forkserver (by name: the server's sys.path holds PYTHONPATH, not benchmarks/).
PRELOAD = (
    "torch",
    "torchvision",
    "pytorch_lightning",
    "onnx",
    "onnx.reference",
    "onnxruntime",
    "matplotlib.pyplot",
    "qatsparse.callbacks",
    "qatsparse.pipeline",
    "qatsparse.export.fp16",
    "qatsparse.export.lint",
    "qatsparse.export.tensorrt",
    "qatsparse.report",
    "timm",
    "transformers",
)


def _context() -> Any:
    """A forkserver that imports torch, Lightning, qatsparse, timm and transformers once; each model runs in
    a fresh process forked from it (isolated, without paying the imports again)."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing

        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(list(PRELOAD))
    return _CONTEXT


def stop_server() -> None:
    """Stop the forkserver (it holds the preloaded libraries, about 1 GB) until the next model needs it.

    The standard library has no public call for this; ``ForkServer._stop`` exists since Python 3.8.
    """
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)
    if stop is not None:
        stop()


def _child(model_id: str, workdir: str, threads: int) -> None:
    from coverage_run import run_to_file  # heavy imports happen in the child (preloaded by the server)

    run_to_file(model_id, workdir, threads)


def run_isolated(
    spec: ModelSpec, workdir: Path, timeout_s: float = 1200, max_rss_gb: float = 10.0, threads: int = 1
) -> dict[str, Any]:
    """Run one model in its own process; a crash, a timeout or a memory overrun is a failure record.

    The process is killed (by its id) once it has run ``timeout_s`` (time it spent stopped does not
    count) or its resident memory passes ``max_rss_gb``; the stage it was in comes from the file it
    keeps up to date.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    out, stage, err = workdir / "record.json", workdir / "stage", workdir / "stderr.txt"
    for f in (out, stage):
        f.unlink(missing_ok=True)
    proc = _context().Process(target=_child, args=(spec.id, str(workdir), threads), daemon=True)
    t0 = last = time.perf_counter()
    active = peak = 0.0
    killed = ""
    proc.start()
    while proc.is_alive():
        proc.join(POLL_S)
        now = time.perf_counter()
        # On a shared machine a scheduler may stop (SIGSTOP) the process or this one: only time during
        # which the process could run counts, and a jump in this process's clock (it was stopped) does not.
        if not _stopped(proc.pid):
            active += min(now - last, 4 * POLL_S)
        last = now
        peak = max(peak, _rss_gb(proc.pid))
        if peak > max_rss_gb:
            killed = f"MemoryBudget: resident memory {peak:.1f} GB > the run's budget of {max_rss_gb:g} GB"
        elif active > timeout_s:
            killed = f"Timeout: still running after {timeout_s:g} s"
        if killed and proc.is_alive():
            proc.kill()
            proc.join()
    elapsed = round(time.perf_counter() - t0, 1)
    if out.exists() and not killed:
        record = json.loads(out.read_text())
        record["wall_s"] = elapsed
        return record
    last_stage = stage.read_text() if stage.exists() else "start"
    if killed:
        kind, message = killed.split(": ", 1)
    else:
        rc = proc.exitcode or 0
        kind = f"Crash ({signal.Signals(-rc).name})" if rc < 0 else f"Crash (exit {rc})"
        message = f"the process died during {last_stage!r} without a result"
    return {
        "id": spec.id,
        "zoo": spec.zoo,
        "name": spec.name,
        "input": spec.input_desc,
        **({"settings": spec.note} if spec.note else {}),
        "status": "fail",
        "error": {"type": kind, "message": message, "stage": last_stage, "stderr_tail": _stderr_tail(err)},
        "time_s": elapsed,
        "wall_s": elapsed,
        "peak_rss_gb": round(peak, 2),
    }
