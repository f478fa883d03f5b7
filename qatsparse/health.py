"""Numerical health after a compression step: a loss or gradient that turns non-finite or explodes is
reported at once, with the step and the layers most likely responsible.

Pruning and the start of quantization change the network abruptly; when that goes wrong (QAT ranges
calibrated on statistics training does not see, a learning rate too large for the perturbed model) the
loss or the gradients jump by orders of magnitude or turn NaN within a step or two, and every later step
is wasted. :class:`HealthMonitor` watches the gradient norm and the loss for ``window`` steps after a
compression step. It compares the gradient norm with its median over the few steps before the event (or
the first step after it, when the event is at step 0) and, at the first step that is non-finite or more
than ``factor`` times larger, names the layers whose gradients grew most relative to the last step
before the event (non-finite ones first; layers whose weights or BatchNorm statistics are non-finite
are named too). Inside the window, one gradient-norm kernel per step, shared by the callbacks that watch
the same model, whose result the callbacks read a step later (:class:`PendingValues`): no GPU sync;
outside it, nothing.

Example:
    >>> model = nn.Linear(4, 2); mon = HealthMonitor(window=10, factor=100.0)
    >>> mon.start("QAT started", step=0)
    >>> model(torch.ones(1, 4)).sum().backward(); mon.check_gradients(model, step=0) is None
    True
    >>> _ = model.weight.grad.fill_(float("nan")); mon.check_gradients(model, step=1).what
    'non-finite gradients'
"""

from __future__ import annotations

import math
import statistics
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from qatsparse.sharding import clean_name  # FSDP / activation checkpointing: the names the user wrote


@dataclass
class HealthEvent:
    """A non-finite or exploding loss or gradient after a compression step.

    Attributes:
        step: the optimizer step at which it was seen.
        after: the compression step it follows (e.g. ``"QAT started at step 330"``).
        what: what went wrong (``"non-finite gradients"``, ``"gradient norm 1.2e+11 (x1e+10 its norm before)"``...).
        layers: the layers most likely responsible, with their numbers.
    """

    step: int
    after: str
    what: str
    layers: list[str] = field(default_factory=list)

    def message(self) -> str:
        named = "; ".join(self.layers) if self.layers else "no layer stands out"
        return f"qatsparse: {self.what} at step {self.step}, {self.after}; most likely: {named}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Per model: who owns each parameter (module names as the user wrote them) and the parameters, listed once.
#: Walking the module tree with names costs Python time every step otherwise (0.8 ms per call on a quantized
#: ResNet-50 or ViT-B/16: benchmarks/results/health_overhead_cpu.json), time a GPU waiting at the sync idles.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, tuple[list[str], list[nn.Parameter]]] = weakref.WeakKeyDictionary()
#: The last norms launched, with what they were launched for: both compression callbacks check the same
#: gradients before the same optimizer step, and the second one reuses the first one's norms.
_LAST: dict[str, Any] = {"key": None, "norms": None}


def _parameter_owners(model: nn.Module, refresh: bool = False) -> tuple[list[str], list[nn.Parameter]]:
    plan = None if refresh else _OWNERS.get(model)
    if plan is None:
        owners, params = [], []
        for name, m in model.named_modules():
            for p in m.parameters(recurse=False):
                owners.append(clean_name(name) or "<model>")
                params.append(p)
        plan = _OWNERS[model] = (owners, params)
    return plan


def forget_parameters(model: nn.Module) -> None:
    """List ``model``'s parameters again at the next check (call after changing its modules or parameters)."""
    _OWNERS.pop(model, None)
    _LAST["key"] = None


class PendingValues:
    """Numbers computed on the device and on their way to the host without making the host wait: a
    non-blocking copy into pinned memory and an event behind it. :meth:`get` waits for that event, which a
    step later has long passed (hand-written: Lightning and torch have no deferred read of a value).

    Example:
        >>> PendingValues(torch.tensor([1.0, 4.0])).get()
        [1.0, 4.0]
    """

    def __init__(self, values: torch.Tensor) -> None:
        values = values.detach().float().reshape(-1)
        self._event = None
        if values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values
        self._list: list[float] | None = None

    def get(self) -> list[float]:
        if self._list is None:
            if self._event is not None:
                self._event.synchronize()
            self._list = self._host.tolist()
        return self._list


class PendingNorms:
    """Gradient norm of each module's own parameters (inf when non-finite) of one step, read when needed."""

    def __init__(self, owners: list[str], norms: PendingValues) -> None:
        self._owners, self._norms = owners, norms
        self._layers: dict[str, float] | None = None

    def layers(self) -> dict[str, float]:
        if self._layers is None:
            out: dict[str, float] = {}
            for owner, n in zip(self._owners, self._norms.get()):
                out[owner] = out.get(owner, 0.0) + n * n
            self._layers = {k: math.sqrt(v) if math.isfinite(v) else math.inf for k, v in out.items()}
        return dict(self._layers)


def launch_grad_norms(model: nn.Module, step: int | None = None) -> PendingNorms | None:
    """Start computing the gradient norms of ``model``'s modules: one fused norm kernel and a non-blocking
    copy; shared by every caller with the same ``step`` (and the same gradient tensors). None without
    gradients."""
    owners, params = _parameter_owners(model)
    present = [(o, p.grad) for o, p in zip(owners, params) if p.grad is not None]
    if not present:
        return None
    # The same step, model and gradient tensors (and no in-place change since): the same norms.
    key = None if step is None else (id(model), step, len(present), id(present[0][1]), present[-1][1]._version)
    if key is not None and key == _LAST["key"]:
        return _LAST["norms"]
    norms = torch.stack([n.float() for n in torch._foreach_norm([g for _, g in present])])
    pending = PendingNorms([o for o, _ in present], PendingValues(norms))
    _LAST["key"], _LAST["norms"] = key, pending
    return pending


def _module_grad_norms(model: nn.Module, step: int | None = None) -> dict[str, float]:
    """Gradient norm of each module's own parameters, now (waits for the device)."""
    pending = launch_grad_norms(model, step)
    return {} if pending is None else pending.layers()


def _nonfinite_state(model: nn.Module) -> list[str]:
    """Modules whose own parameters or buffers (BatchNorm running statistics) hold inf/NaN."""
    out = []
    for name, m in model.named_modules():
        tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
            out.append(clean_name(name) or "<model>")
    return out


class HealthMonitor:
    """Watch the gradient norm and the loss for ``window`` steps after a compression step.

    Args:
        window: how many optimizer steps after the event to watch.
        factor: a gradient norm (or loss) this many times its value before the event counts as exploded.
        baseline_steps: how many steps before the event give the reference gradient norm.
        top: how many layers to name.
    """

    def __init__(
        self, window: int = 200, factor: float = 1e3, baseline_steps: int = 4, top: int = 3, nonfinite_patience: int = 0
    ) -> None:
        if window < 1 or factor <= 1:
            raise ValueError(f"window must be >= 1 and factor > 1, got {window}, {factor}")
        self.window, self.factor, self.baseline_steps, self.top = int(window), float(factor), baseline_steps, top
        #: non-finite gradients tolerated in a row (FP16 AMP's GradScaler skips such steps and lowers its scale)
        self.nonfinite_patience = int(nonfinite_patience)
        self._nonfinite_run = 0
        self.after: str | None = None
        self.start_step: int | None = None
        self.events: list[HealthEvent] = []
        self._norms: list[float] = []  # gradient norms of the steps before the event
        self._losses: list[float] = []
        self._layers_before: dict[str, float] = {}
        self._reference: float | None = None
        self._loss_reference: float | None = None

    # ------------------------------------------------------------------ before the event
    def wants_baseline(self, step: int, event_step: int) -> bool:
        """Whether step ``step`` is one of the few steps before a compression planned at ``event_step``."""
        return self.after is None and event_step - self.baseline_steps <= step < event_step

    def record_baseline(self, model: nn.Module, step: int | None = None) -> None:
        """Gradient norms (global and per layer) of a step before the event."""
        layers = _module_grad_norms(model, step)
        if layers:
            self._norms.append(math.sqrt(sum(v * v for v in layers.values())))
            self._layers_before = layers

    def record_loss(self, loss: float) -> None:
        """The loss of a step before the event."""
        if math.isfinite(loss):
            self._losses.append(loss)

    # ------------------------------------------------------------------ the event and after
    def start(self, after: str, step: int) -> None:
        """The compression happened at ``step`` (``after`` describes it for the messages)."""
        self.after, self.start_step = after, int(step)
        finite = [n for n in self._norms if math.isfinite(n)]
        self._reference = statistics.median(finite) if finite else None
        self._loss_reference = statistics.median(self._losses) if self._losses else None

    def watching(self, step: int) -> bool:
        return self.start_step is not None and not self.events and step < self.start_step + self.window

    def check_gradients(
        self, model: nn.Module, step: int, layers: dict[str, float] | None = None
    ) -> HealthEvent | None:
        """Check step ``step``'s gradients: their per-layer norms ``layers`` (else the model's gradients now,
        before the optimizer step); the event, the first time only."""
        if not self.watching(step):
            return None
        layers = _module_grad_norms(model, step) if layers is None else layers
        if not layers:
            return None
        total = math.sqrt(sum(v * v for v in layers.values()))
        self._nonfinite_run = 0 if math.isfinite(total) else self._nonfinite_run + 1
        if not math.isfinite(total) and self._nonfinite_run <= self.nonfinite_patience:
            return None
        if self._reference is None and math.isfinite(total):  # no steps before the event: the first one after
            self._reference = total
            self._layers_before = layers
            return None
        if math.isfinite(total) and total <= self.factor * max(self._reference or 0.0, 1e-12):
            return None
        if math.isfinite(total):
            what = f"gradient norm {total:.3g} (x{total / max(self._reference or 1e-12, 1e-12):.3g} its norm before)"
        else:
            what = "non-finite gradients"
        return self._report(step, what, layers, model)

    def check_loss(
        self, loss: float, model: nn.Module, step: int, layers: dict[str, float] | None = None
    ) -> HealthEvent | None:
        """Check step ``step``'s loss (e.g. from ``on_train_batch_end``), naming layers by that step's gradient
        norms ``layers`` (else the model's gradients now); the event, the first time only."""
        if not self.watching(step):
            return None
        if math.isfinite(loss):
            ref = self._loss_reference
            if ref is None or abs(loss) <= self.factor * max(abs(ref), 1e-12):
                return None
            what = f"loss {loss:.3g} (x{abs(loss) / max(abs(ref), 1e-12):.3g} its value before)"
        else:
            what = "non-finite loss"
        return self._report(step, what, _module_grad_norms(model) if layers is None else layers, model)

    def _report(self, step: int, what: str, layers: dict[str, float], model: nn.Module) -> HealthEvent:
        named = [f"{n} (weights or running statistics non-finite)" for n in _nonfinite_state(model)]
        before = self._layers_before
        order = list(layers)  # module registration order, which follows the forward order in most models
        nonfinite = [n for n in order if not math.isfinite(layers[n])]
        if nonfinite and len(nonfinite) < len(order):
            # The backward pass runs from the output to the input: a gradient that overflows at one layer is
            # non-finite in every layer before it, so the non-finite layers nearest the output are the
            # likeliest source (the layers after them still have finite gradients).
            for i, n in enumerate(reversed(nonfinite)):
                if len(named) >= self.top:
                    break
                named.append(f"{n} (gradient non-finite" + ("; every layer after it finite)" if i == 0 else ")"))
        else:

            def growth(item: tuple[str, float]) -> float:
                n, v = item
                return math.inf if not math.isfinite(v) else v / max(before.get(n, 0.0), 1e-12)

            for n, v in sorted(layers.items(), key=growth, reverse=True):
                if len(named) >= self.top:
                    break
                was = before.get(n)
                now = "non-finite" if not math.isfinite(v) else f"{v:.3g}"
                named.append(f"{n} (gradient norm {now}" + (f", was {was:.3g})" if was is not None else ")"))
        event = HealthEvent(step, self.after or "after compression", what, named[: max(self.top, 1)])
        self.events.append(event)
        return event

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"events": [e.to_dict() for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = [HealthEvent(**e) for e in state.get("events", [])]
