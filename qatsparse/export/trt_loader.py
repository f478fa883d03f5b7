"""TensorRT loaded lazily: whether it is usable here, the module itself (10.x or newer), and the one
process-wide logger every qatsparse Builder, parser and Runtime is given."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch


def tensorrt_available() -> bool:
    """True when ``import tensorrt`` works and a CUDA device is present."""
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def import_tensorrt() -> Any:
    """``tensorrt``, or a RuntimeError that says how to install it (or that it is older than 10.0)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError(
            "TensorRT is not installed: install the `tensorrt` extra from NVIDIA's package index "
            "(pip install 'qatsparse[tensorrt]' --extra-index-url https://pypi.nvidia.com)"
        ) from e
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise RuntimeError(f"TensorRT {trt.__version__} is too old: qatsparse needs TensorRT >= 10.0 (strong typing)")
    return trt


_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()


def trt_logger() -> Any:
    """The process-wide ``trt.ILogger`` every qatsparse Builder, parser and Runtime is given.

    TensorRT keeps the first logger a process hands it and ignores later ones, so a second logger (one per
    build, as before) could receive nothing. This one is created once (as Polygraphy does with its own),
    echoes warnings and errors to stderr, and lets a build :meth:`capture` the INFO lines it needs (the
    sparsity lists). If another library registered its logger first, a capture stays empty and the build
    facts say the log was not seen instead of reporting empty lists.
    """
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            _LOGGER = _make_logger(import_tensorrt())
        return _LOGGER


def _make_logger(trt: Any) -> Any:
    severity = trt.ILogger.Severity

    class QatsparseTrtLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # required by the Python API for custom loggers
            self._sinks: list[list[str]] = []
            self._lock = threading.Lock()
            self.echo_level = int(severity.WARNING)

        def log(self, sev: Any, msg: str) -> None:  # called from TensorRT's threads; must not raise
            try:
                level = int(sev)
                if level <= int(severity.INFO):
                    with self._lock:
                        for sink in self._sinks:
                            sink.append(msg)
                if level <= self.echo_level:
                    print(f"[TensorRT] {getattr(sev, 'name', level)}: {msg}", file=sys.stderr)
            except Exception:  # pragma: no cover - nothing may escape into TensorRT
                pass

        @contextlib.contextmanager
        def capture(self, verbose: bool = False) -> Iterator[list[str]]:
            """Collect the INFO-and-above lines logged inside the block (and echo them with ``verbose``)."""
            sink: list[str] = []
            old = self.echo_level
            with self._lock:
                self._sinks.append(sink)
                if verbose:
                    self.echo_level = int(severity.INFO)
            try:
                yield sink
            finally:
                with self._lock:
                    self._sinks.remove(sink)
                    self.echo_level = old

    return QatsparseTrtLogger()
