"""Interleaved, paired timing of several Lightning training configurations in one process.

A *lane* is one configuration: its own model, callbacks and ``Trainer.fit``, running in its own thread.
Only one lane runs at a time; the others wait inside a callback hook (parked), so every step of every
configuration goes through the real ``Trainer`` loop and the real callbacks, and no configuration is
compiled, calibrated or pruned twice. The life of a lane:

1. **warm-up** (``warmup`` steps, alone): compilation, calibration, pruning, cuDNN autotuning;
2. **memory** (``memory_steps`` steps, alone): the peak memory of the configuration, from
   ``torch.cuda.reset_peak_memory_stats`` at the first of these steps, minus what was allocated before
   the lane was built (the other lanes, parked, allocate nothing meanwhile);
3. **blocks**: the coordinator runs rounds; in each round every lane runs one block of
   ``block_steps`` timed steps, and the order of the lanes is reversed every round, so each candidate
   runs as often right before its baseline as right after it (an A B C | C B A design that cancels
   linear drift of clocks or temperature).

A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` with CUDA events (no host
synchronisation inside a block; one at each block end), so forward, backward, optimizer step and every
callback hook are counted. On the CPU the host clock is used. The ratio of two lanes in one round is the
ratio of their block medians; :func:`ratio_stats` summarises the rounds (median, min, max, quartiles).

Hand-written because Lightning's fit loop cannot be paused and resumed across Trainers: calling
``fit`` again would re-run setup hooks and recompile, and separate processes would not pair anything.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

_STOP = -1
_BLOCK, _PROFILE = "block", "profile"


class LaneClock(pl.Callback):
    """The callback that times a lane's steps and parks its thread between blocks (put it first)."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self._step = 0
        self._left = 0  # steps left in the current block
        self._events: list[tuple[Any, Any]] = []
        self._t0 = 0.0
        self._host: list[float] = []
        self._profiler: Any = None

    # ------------------------------------------------------------------ timing
    def _cuda(self) -> bool:
        return self.lane.device == "cuda"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lane = self.lane
        if self._step == lane.warmup:  # first memory step: alone, after warm-up
            if self._cuda():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._left = lane.memory_steps
            self._block_start()
        if self._left > 0:
            if self._cuda():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self._events.append((start, end))
            else:
                self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        lane = self.lane
        self._step += 1
        if self._left <= 0:
            return
        if self._cuda():
            self._events[-1][1].record()
        else:
            self._host.append((time.perf_counter() - self._t0) * 1e3)
        self._left -= 1
        if self._left > 0:
            return
        times = self._block_end()
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            lane.profile = profile_rows(self._profiler, len(times))
            self._profiler = None
        if not lane.solo_ms:  # the memory phase just ended
            lane.solo_ms = times
            if self._cuda():
                lane.peak_bytes = torch.cuda.max_memory_allocated() - lane.base_bytes
        else:
            lane.blocks.append(times)
        self._park(trainer)

    def _block_start(self) -> None:
        self._events, self._host = [], []

    def _block_end(self) -> list[float]:
        if self._cuda():
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self._events]
        return list(self._host)

    # ------------------------------------------------------------------ baton
    def _park(self, trainer: pl.Trainer) -> None:
        self.lane._parked.set()
        kind, steps = self.lane._commands.get()
        if steps == _STOP:
            trainer.should_stop = True
            return
        self._left = steps
        self._block_start()
        if kind == _PROFILE:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self._cuda():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=acts)
            self._profiler.__enter__()


class Lane:
    """One configuration running ``fit(lane)`` in its own thread, driven block by block.

    ``fit`` builds the model, the callbacks (with ``lane.clock`` first) and the Trainer, and calls
    ``trainer.fit`` with a training loader that never ends; the lane stops it.

    Example:
        >>> lane = Lane("amp", fit_amp, warmup=10, memory_steps=5, device="cuda")  # doctest: +SKIP
        >>> lane.start(); lane.run_block(10); lane.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        name: str,
        fit: Callable[[Lane], None],
        warmup: int,
        memory_steps: int,
        device: str,
        timeout_s: float = 3600.0,
    ) -> None:
        if memory_steps < 1:
            raise ValueError(f"memory_steps must be >= 1, got {memory_steps}")
        self.name, self.fit, self.warmup, self.memory_steps, self.device = name, fit, warmup, memory_steps, device
        self.timeout_s = timeout_s
        self.clock = LaneClock(self)
        self.solo_ms: list[float] = []  # the memory-phase steps, timed while alone
        self.blocks: list[list[float]] = []
        self.base_bytes = 0
        self.peak_bytes: int | None = None
        self.setup_s: float | None = None
        self.error: str | None = None
        self.info: dict[str, Any] = {}  # whatever fit() wants recorded (versions, what was quantized...)
        self._parked = threading.Event()
        self._commands: queue.Queue[tuple[str, int]] = queue.Queue()
        self.profile: list[dict[str, Any]] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=f"lane-{name}", daemon=True)

    @property
    def ok(self) -> bool:
        return self.error is None

    def _main(self) -> None:
        try:
            self.fit(self)
            if not self._stopping and self.error is None:
                self.error = "fit() returned before the lane was stopped (did the Trainer stop early?)"
        except BaseException as e:  # recorded; the coordinator goes on with the other lanes
            self.error = f"{type(e).__name__}: {e}"[:2000]
            self.info["traceback"] = traceback.format_exc()[-4000:]
        finally:
            self._parked.set()

    def _wait_parked(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._parked.wait(1.0):
            if time.monotonic() > deadline:
                self.error = self.error or f"no answer within {self.timeout_s:.0f} s"
                return

    def start(self) -> None:
        """Build and warm up the lane, measure its memory while alone; returns when it is parked."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base_bytes = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        self._thread.start()
        self._wait_parked()
        self.setup_s = time.perf_counter() - t0

    def run_block(self, steps: int, kind: str = _BLOCK) -> list[float] | None:
        """Run ``steps`` timed steps; the step times in ms, or None if the lane failed."""
        if not self.ok or not self._thread.is_alive():
            self.error = self.error or "the lane's thread ended"
            return None
        n = len(self.blocks)
        self._parked.clear()
        self._commands.put((kind, steps))
        self._wait_parked()
        return self.blocks[-1] if self.ok and len(self.blocks) > n else None

    def run_profile(self, steps: int) -> list[dict[str, Any]] | None:
        """One block under ``torch.profiler`` (not counted in the ratios); its top rows per step."""
        if self.run_block(steps, _PROFILE) is None:
            return None
        self.blocks.pop()
        return self.profile

    def stop(self, timeout_s: float = 120.0) -> None:
        self._stopping = True
        if self._thread.is_alive():
            self._parked.clear()
            self._commands.put((_BLOCK, _STOP))
            self._thread.join(timeout_s)


def profile_rows(prof: Any, steps: int, top: int = 30) -> list[dict[str, Any]]:
    """The ``top`` operators/kernels by self device time (self CPU time on the CPU), in ms per step."""
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        dev = getattr(e, "self_cuda_time_total", 0.0) if dev is None else dev
        tot = getattr(e, "device_time_total", None)
        tot = getattr(e, "cuda_time_total", 0.0) if tot is None else tot
        rows.append(
            {
                "name": e.key[:200],
                "calls_per_step": e.count / steps,
                "self_device_ms": dev / 1e3 / steps,
                "device_total_ms": tot / 1e3 / steps,
                "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps,
            }
        )
    key = "self_device_ms" if any(r["self_device_ms"] for r in rows) else "self_cpu_ms"
    return sorted(rows, key=lambda r: -r[key])[:top]


def ratio_stats(ratios: list[float]) -> dict[str, Any]:
    """Median, min, max and quartiles of per-round ratios (``n`` rounds).

    Example:
        >>> ratio_stats([1.0, 1.2, 1.1, 0.9, 1.05])["median"]
        1.05
    """
    if not ratios:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None, "per_round": []}
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "n": len(ratios),
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "q1": q[0],
        "q3": q[2],
        "per_round": list(ratios),
    }


def round_order(names: list[str], round_index: int) -> list[str]:
    """Lane order of a round: as given in even rounds, reversed in odd ones.

    Example:
        >>> round_order(["a", "b", "c"], 1)
        ['c', 'b', 'a']
    """
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def paired_ratios(
    blocks: dict[str, list[list[float] | None]], pairs: list[tuple[str, str]]
) -> dict[str, dict[str, Any]]:
    """For each ``(candidate, baseline)``: the per-round ratio of block medians, summarised.

    ``blocks[name][r]`` is lane ``name``'s block in round ``r`` (None where it failed); a round counts
    for a pair only when both lanes have a block in it.

    Example:
        >>> paired_ratios({"a": [[2.0, 2.2]], "b": [[1.0, 1.0]]}, [("a", "b")])["a/b"]["median"]
        2.1
    """
    out = {}
    for cand, base in pairs:
        if cand not in blocks or base not in blocks:
            continue
        per_round = [
            statistics.median(c) / statistics.median(b)
            for c, b in zip(blocks[cand], blocks[base])
            if c and b and statistics.median(b) > 0
        ]
        out[f"{cand}/{base}"] = {"candidate": cand, "baseline": base, **ratio_stats(per_round)}
    return out
