"""Checks before optimizer step 0: arguments, the schedule, the output folder and the data layout.

Fail early, lose nothing: whatever can be checked before training is checked before training, with an
error naming the argument, the value and the fix (``docs/errors.md`` lists every one). Argument checks
run when a callback is built; the rest runs at ``on_fit_start`` (after ``setup``, checkpoint restore and
``configure_optimizers``; before the sanity validation and the first step) on every rank:

* each qatsparse callback contributes its checks through a ``preflight(check, trainer, pl_module, data)``
  method that calls the functions below through ``check`` (:class:`Checks`), which collects every
  problem instead of stopping at the first;
* :class:`FitData` reads one training batch and one validation batch, once, without disturbing the
  training pass, and runs the model's forward on them in eval mode, without gradients, with the RNG
  isolated;
* the ranks agree on the outcome, so that all of them raise together (:func:`run_preflight`).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qatsparse.export_preflight import check_engine_available, check_validation
from qatsparse.fit_data import FitData
from qatsparse.forward_check import check_forward, inference_isolated, run_forward

__all__ = [
    "Checks",
    "FitData",
    "PreflightError",
    "check_batch_sizes",
    "check_dirpath",
    "check_engine_available",
    "check_forward",
    "check_int",
    "check_max_metric_drop",
    "check_module_names",
    "check_opset",
    "check_positive",
    "check_quantizable_patterns",
    "check_start_step",
    "check_validation",
    "inference_isolated",
    "preflight_callbacks",
    "run_forward",
    "run_preflight",
    "total_steps",
]


class PreflightError(ValueError, TypeError, RuntimeError):
    """qatsparse found problems before training; no optimizer step was taken.

    It is a ValueError, a TypeError and a RuntimeError -- the types the individual checks raise (a bad
    value, a batch layout the model cannot take, an environment without TensorRT) -- so code catching any
    of them keeps working.
    """


# ----------------------------------------------------------------------------------- arguments
def check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, else a ValueError naming ``owner(name=value)``.

    Example:
        >>> check_int("TwoFourSparsity", "start_step", 3, 0)
        3
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise ValueError(f"{owner}({name}={value!r}): {name} must be an integer >= {minimum}")
    return int(value)


def check_positive(owner: str, name: str, value: Any) -> float:
    """``value`` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}({name}={value!r}): {name} must be a number > 0")
    return float(value)


def check_opset(opset: Any, minimum: int = 17) -> int:
    """The ONNX opset: an integer >= 17 (per-channel Q/DQ; TensorRT 10/11 parse opsets 17+)."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < minimum:
        raise ValueError(
            f"TensorRTExport(opset={opset!r}): opset must be an integer >= {minimum} (per-channel Q/DQ and "
            f"TensorRT 10/11 need it); use opset={minimum} (INT8 graphs with an FP16 remainder use 19 by themselves)"
        )
    return opset


def check_max_metric_drop(value: Any) -> None:
    """A number >= 0, or a non-empty ``{metric name: number >= 0}`` mapping.

    Example:
        >>> check_max_metric_drop({"top1": 0.01})
    """
    fix = "give the largest allowed drop vs the reference as a number >= 0 (e.g. 0.01) or {metric: number}"
    items = value.items() if isinstance(value, Mapping) else [(None, value)]
    if isinstance(value, Mapping) and not value:
        raise ValueError(f"TensorRTExport(max_metric_drop={{}}): the mapping names no metric; {fix}")
    for name, bound in items:
        ok = not isinstance(bound, bool) and isinstance(bound, (int, float)) and math.isfinite(bound) and bound >= 0
        if not ok:
            where = f"max_metric_drop[{name!r}]" if name is not None else "max_metric_drop"
            raise ValueError(f"TensorRTExport({where}={bound!r}): a drop bound must be a finite number >= 0; {fix}")


def check_batch_sizes(value: Sequence[Any]) -> tuple[int, int, int]:
    """TensorRT's optimization profile: three integers ``1 <= min <= opt <= max``."""
    sizes = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    ok = len(sizes) == 3 and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes)
    if not ok or not sizes[0] <= sizes[1] <= sizes[2]:
        raise ValueError(
            f"TensorRTExport(batch_sizes={value!r}): batch_sizes is TensorRT's optimization profile, three integers "
            "1 <= min <= opt <= max, e.g. (1, 32, 256)"
        )
    return sizes  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- fit start
def check_dirpath(path: str | Path, owner: str = "TensorRTExport") -> Path:
    """The output folder can be created (or is a folder) and written to. Leaves no trace: the nearest
    existing folder on the path gets a test file, which is removed; nothing is created.

    Raises:
        ValueError: naming the path, what is wrong and the fix.
    """
    path = Path(path)
    arg = f"{owner}(dirpath={str(path)!r})"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{arg}: {path} is an existing file, not a folder; choose another dirpath")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{arg}: the folder cannot be created, {existing} is a file; choose another dirpath")
    try:
        fd, probe = tempfile.mkstemp(prefix=".qatsparse-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "write to the folder" if existing == path.absolute() else f"create the folder in {existing}"
        raise ValueError(
            f"{arg}: cannot {what} ({type(e).__name__}: {e.strerror or e}); choose a dirpath where this process "
            "may write"
        ) from None
    return path


def total_steps(trainer: Any) -> float:
    """The optimizer steps this fit will take (inf when unbounded or unknown), Lightning's own estimate."""
    try:
        n = trainer.estimated_stepping_batches
    except Exception:  # e.g. a changing accumulate_grad_batches: Lightning cannot tell, so nothing is checked
        return float("inf")
    return float("inf") if n is None or n < 0 else float(n)


def check_start_step(trainer: Any, owner: str, start_step: int, done: bool = False) -> None:
    """A stage starting at ``start_step`` must be reached: ``start_step < total_steps(trainer)``.

    A compression callback that never runs leaves a dense FP32 model whose report would pass, so this is an
    error, not a warning. ``done``: the stage already ran (a resumed run), nothing to check.
    """
    if done:
        return
    total = total_steps(trainer)
    if start_step < total:
        return
    raise ValueError(
        f"{owner}(start_step={start_step}) is never reached: this Trainer stops after {int(total)} optimizer "
        f"step(s) ({_stop_reason(trainer, total)}). Set start_step below {int(total)}, or train longer "
        "(max_steps / max_epochs)"
    )


def _stop_reason(trainer: Any, total: float) -> str:
    """Why the fit stops after ``total`` steps, in the Trainer's own terms."""
    if trainer.max_steps != -1 and total == trainer.max_steps:
        return f"max_steps={trainer.max_steps}"
    parts = [f"max_epochs={trainer.max_epochs}", f"{trainer.num_training_batches} training batches per epoch"]
    if trainer.accumulate_grad_batches != 1:
        parts.append(f"accumulate_grad_batches={trainer.accumulate_grad_batches}")
    return " x ".join(parts[:2]) + "".join(f", {p}" for p in parts[2:])


def check_module_names(module: nn.Module, names: Sequence[str], argument: str) -> None:
    """Every name in ``names`` is a submodule of ``module``."""
    known = {n for n, _ in module.named_modules()}
    missing = [n for n in names if n not in known]
    if missing:
        some = sorted(known - {""})[:8]
        raise ValueError(f"{argument}: {missing} are not module names of {type(module).__name__} (some are {some})")


def check_quantizable_patterns(module: nn.Module, exclude: Sequence[str]) -> None:
    """QAT's ``exclude`` patterns each match a layer that quantization would change."""
    from qatsparse.patterns import compile_patterns, require_matches
    from qatsparse.quantization.layers import is_quant_layer
    from qatsparse.quantization.twins import quant_class_for

    names = [n for n, m in module.named_modules() if is_quant_layer(m) or quant_class_for(m)[0] is not None]
    arg = f"QuantizationAwareTraining(exclude={list(exclude)!r})"
    require_matches(compile_patterns(exclude, arg), names, arg, "quantizable layer")


class Checks:
    """Calls check functions and collects the problems they raise (ValueError, TypeError, OSError,
    RuntimeError) instead of stopping at the first; other exceptions are bugs and propagate.

    Example:
        >>> check = Checks(); check(check_int, "X", "n", -1, 0); check.problems
        ['X(n=-1): n must be an integer >= 0']
    """

    def __init__(self) -> None:
        self.problems: list[str] = []

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            self.problems.append(str(e))
            return None


def preflight_callbacks(trainer: Any) -> list[Any]:
    """The Trainer's callbacks that take part in the preflight (those with a ``preflight`` method)."""
    return [cb for cb in trainer.callbacks if callable(getattr(cb, "preflight", None))]


def run_preflight(trainer: Any, pl_module: nn.Module, caller: Any = None) -> None:
    """Run every qatsparse callback's checks once per fit (by the first of them, ``caller``) on every rank.

    Raises:
        PreflightError: listing every problem found on this rank (or saying that another rank found some),
            before any optimizer step.
    """
    callbacks = preflight_callbacks(trainer)
    if not callbacks or (caller is not None and caller is not callbacks[0]):
        return
    from qatsparse.sharding import check_strategy, full_weights

    check, data = Checks(), FitData(trainer, pl_module)
    check(check_strategy, trainer, pl_module)
    if not check.problems:  # an unsupported strategy would make the checks below fail in confusing ways
        with full_weights(trainer):  # FSDP: the forwards below need the full weights (every rank gathers them)
            for cb in callbacks:
                cb.preflight(check, trainer, pl_module, data)
    ok = trainer.strategy.reduce_boolean_decision(not check.problems, all=True)
    if ok:
        return
    if not check.problems:
        raise PreflightError("qatsparse: another rank found problems before training (see its error)")
    items = "\n".join(f"  {i}. {p}" for i, p in enumerate(check.problems, 1))
    n = len(check.problems)
    raise PreflightError(
        f"qatsparse found {n} problem{'s' if n > 1 else ''} before training (no optimizer step was taken):\n{items}"
    )
