"""Progress of qatsparse's own long steps (calibration, export, engine build, validation) in the Trainer's style.

:func:`progress_for` follows the Trainer's progress bar: a ``RichProgressBar`` gives rich tasks (added to the
bar's own live display while training runs), a ``TQDMProgressBar`` gives tqdm bars of Lightning's ``Tqdm``
class, and no bar (``enable_progress_bar=False``), a disabled bar or a non-zero rank gives :data:`QUIET`. The
pure functions take a :class:`Progress` (default :data:`QUIET`), so they stay silent unless asked.

Example:
    >>> with QUIET.task("calibrating", total=4) as task:
    ...     task.advance()
"""

from __future__ import annotations

import sys
import threading
from typing import Any


class ProgressTask:
    """One task: ``advance(n)``, ``update(completed=, total=, description=)``, ``close()``; a context manager.
    This base class does nothing (the quiet task)."""

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` more steps done."""

    def update(self, completed: int | None = None, total: int | None = None, description: str | None = None) -> None:
        """Set the steps done, the total or the description."""

    def close(self) -> None:
        """Finish the task (its display stays or goes the way the Trainer's bars do)."""

    def __enter__(self) -> ProgressTask:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Progress:
    """Makes tasks. This base class is quiet: every task does nothing.

    Example:
        >>> Progress().task("exporting").advance()
    """

    def task(self, description: str, total: int | None = None) -> ProgressTask:
        """A new task; ``total=None`` when the number of steps is unknown."""
        return ProgressTask()


#: The progress that shows nothing.
QUIET = Progress()


class _RichTask(ProgressTask):
    def __init__(self, owner: RichProgress, progress: Any, task_id: Any) -> None:
        self.owner, self.progress, self.id = owner, progress, task_id
        self.closed = False

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.id, n)

    def update(self, completed: int | None = None, total: int | None = None, description: str | None = None) -> None:
        kwargs: dict[str, Any] = {}
        if completed is not None:
            kwargs["completed"] = completed
        if total is not None:
            kwargs["total"] = total
        if description is not None:
            kwargs["description"] = description
        self.progress.update(self.id, **kwargs)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner._finish(self)


class RichProgress(Progress):
    """Rich tasks: on ``shared`` (the Trainer's live ``rich.progress.Progress``) when there is one, where they stay
    once done as the Trainer's own bars do, else on a display of our own, started with the first task and stopped
    when the last one closes.

    Example:
        >>> with RichProgress().task("validating", total=2) as t:  # doctest: +SKIP
        ...     t.advance(2)
    """

    def __init__(self, shared: Any = None, console: Any = None) -> None:
        self.shared, self.console = shared, console
        self._own: Any = None
        self._open: list[_RichTask] = []
        self._lock = threading.Lock()

    def _display(self) -> Any:
        if self.shared is not None:
            return self.shared
        if self._own is None:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichDisplay

            columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn()]  # fmt: skip
            self._own = RichDisplay(*columns, console=self.console)
            self._own.start()
        return self._own

    def task(self, description: str, total: int | None = None) -> ProgressTask:
        with self._lock:
            display = self._display()
            if total is None and display is self.shared:
                total = float("inf")  # how Lightning's own display takes an open-ended task
            t = _RichTask(self, display, display.add_task(description, total=total))
            self._open.append(t)
        return t

    def _finish(self, task: _RichTask) -> None:
        with self._lock:
            info = task.progress._tasks[task.id]
            if info.total is None or info.total == float("inf"):  # an open-ended task is done when it closes
                done = max(int(info.completed), 1)
                task.progress.update(task.id, total=done, completed=done)
            self._open.remove(task)
            if not self._open and self._own is not None:
                self._own.stop()
                self._own = None


class _TqdmTask(ProgressTask):
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def update(self, completed: int | None = None, total: int | None = None, description: str | None = None) -> None:
        if total is not None:
            self.bar.total = total
        if description is not None:
            self.bar.set_description(description, refresh=False)
        if completed is not None:
            self.bar.n = completed
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class TqdmProgress(Progress):
    """tqdm bars of ``bar_class`` (Lightning's ``Tqdm``), written where the Trainer's bars go (stdout).

    Example:
        >>> from tqdm import tqdm
        >>> import io; t = TqdmProgress(tqdm, file=io.StringIO()).task("exporting", total=1); t.advance(); t.close()
    """

    def __init__(self, bar_class: Any = None, file: Any = None) -> None:
        if bar_class is None:
            from tqdm import tqdm as bar_class
        self.bar_class, self.file = bar_class, file

    def task(self, description: str, total: int | None = None) -> ProgressTask:
        bar = self.bar_class(desc=description, total=total, leave=True, dynamic_ncols=True,
                             file=self.file or sys.stdout, smoothing=0)  # fmt: skip
        return _TqdmTask(bar)


def _class_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def progress_for(trainer: Any) -> Progress:
    """The progress matching ``trainer``'s progress bar (both Lightning packages): rich for a ``RichProgressBar``,
    tqdm for a ``TQDMProgressBar``, :data:`QUIET` for none, a disabled one, another kind, or a non-zero rank.

    Example:
        >>> progress_for(None) is QUIET
        True
    """
    if trainer is None or not getattr(trainer, "is_global_zero", True):
        return QUIET
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or getattr(bar, "is_disabled", False):
        return QUIET
    names = _class_names(bar)
    if "RichProgressBar" in names:
        live = getattr(bar, "progress", None)
        if live is not None and getattr(bar, "_progress_stopped", False):
            live = None
        return RichProgress(shared=live, console=getattr(bar, "_console", None))
    if "TQDMProgressBar" in names:
        base = next(c for c in type(bar).__mro__ if c.__name__ == "TQDMProgressBar")
        return TqdmProgress(getattr(sys.modules.get(base.__module__), "Tqdm", None))
    return QUIET
