"""Run calibration batches through a model whose quantizers collect statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from qatsparse.attention import fast_paths_off
from qatsparse.quantization.layers import is_quant_layer
from qatsparse.quantization.modules import quantizers
from qatsparse.quantization.quantizer import TensorQuantizer

Batches = Iterable[Any] | Callable[[], Iterable[Any]]


@contextlib.contextmanager
def _replayable_rng(devices: list[int]) -> Iterator[Callable[[], None]]:
    """Fork the RNG; the yielded function resets it to the state at entry (so that a shuffling
    dataloader iterated twice yields the same batches twice)."""
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]

        def reset() -> None:
            torch.set_rng_state(cpu)
            for d, s in zip(devices, cuda):
                torch.cuda.set_rng_state(s, d)

        yield reset


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Batches,
    forward: Callable[[Any], Any],
    unreached: Literal["raise", "keep"] = "raise",
    batchnorm: Literal["batch", "running"] = "batch",
) -> int:
    """Calibrate every INT8 quantizer of ``model``: ``forward(batch)`` for each batch, then set ``amax``.

    All quantizers pass their input through unchanged while calibrating (as in pytorch-quantization:
    each layer's statistics are those of the float model). Runs in eval mode (no dropout) and restores the
    previous mode, with PyTorch's attention fast paths off so that every quantized layer really runs
    (:func:`qatsparse.attention.fast_paths_off`).

    BatchNorm: with ``batchnorm="batch"`` (default) BatchNorm layers normalize with the statistics of each
    calibration batch -- what the QAT training steps that follow compute -- and their running statistics
    are restored afterwards, so calibration never changes the model. With ``"running"`` they use their
    running statistics (what a deployed model computes), which is the same once those have settled, but
    far off when QAT starts early: ranges calibrated on activations training never sees made the first
    QAT steps of ResNet-50 and MNASNet non-finite (docs/quantization.md, ``benchmarks/bn_calibration.py``).

    A quantizer the batches never reached (its layer's ``forward`` did not run) stays uncalibrated: the
    identity. ``unreached="raise"`` then raises ``RuntimeError`` naming those quantizers;
    ``"keep"`` returns normally and :func:`unreached_layers` names the layers (the QAT callback keeps
    them in higher precision). Quantizers a layer declares optional (``QuantLayer.optional_quantizers``,
    e.g. the key/value quantizers of a self-attention) are never an error.

    When a histogram calibrator (entropy, percentile, mse) is present the batches are run twice:
    the first pass finds ``max |x|`` of each quantizer, so that the histograms of the second pass
    span the whole range with the same 2048 bins whatever the batch size and on every DDP rank
    (pytorch-quantization instead sets the range from the first batch; docs/quantization.md says
    why we don't). ``batches`` may be a re-iterable (list, DataLoader), a function returning a fresh
    iterable, or a one-shot iterator (then kept in memory for the second pass). The RNG is reset
    before the second pass, so a shuffling DataLoader replays the same batches, and is restored at
    the end (training randomness is untouched).

    Under DDP each quantizer's statistics are reduced across ranks (max for max, summed histograms
    for the others), so every rank ends with the same ``amax``. Returns the number of batches seen
    in one pass.

    Example:
        >>> from qatsparse.quantization import QuantConfig, quantize_model
        >>> m = nn.Sequential(nn.Linear(4, 4)); _ = quantize_model(m, QuantConfig())
        >>> calibrate(m, [torch.randn(8, 4)], m)
        1
    """
    if unreached not in ("raise", "keep"):
        raise ValueError(f"unreached must be 'raise' or 'keep', got {unreached!r}")
    if batchnorm not in ("batch", "running"):
        raise ValueError(f"batchnorm must be 'batch' or 'running', got {batchnorm!r}")
    named = {n: q for n, q in quantizers(model).items() if q.precision == "int8"}
    qs = list(named.values())
    seen: set[int] = set()
    handles = [q.register_forward_pre_hook(lambda mod, _args: seen.add(id(mod))) for q in qs]
    for q in qs:
        q.start_calibration()
    cals = [q._calibrator for q in qs if q._calibrator is not None]
    two_pass = any(c.needs_range_pass for c in cals)
    if two_pass and isinstance(batches, Iterator):  # one-shot: keep it for the second pass
        batches = list(batches)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    was_training = model.training
    model.eval()
    bn_state = _batch_statistics(model, handles) if batchnorm == "batch" else []
    try:
        with _replayable_rng(cuda) as reset_rng, fast_paths_off():
            if two_pass:
                for c in cals:
                    if c.needs_range_pass:
                        c.begin_range_pass()
            n = _run(batches, forward)
            if n == 0:
                raise RuntimeError("calibration got no batches")
            if two_pass:
                for c in cals:
                    c.end_range_pass()
                reset_rng()
                _run(batches, forward)
    except BaseException:
        for q in qs:
            q._calibrator = None
        raise
    finally:
        for m, state in bn_state:
            for k, v in state.items():
                getattr(m, k).copy_(v)
        model.train(was_training)
        for h in handles:
            h.remove()
    reached = _reached_anywhere([id(q) in seen for q in qs], qs)
    missing = []
    for (name, q), hit in zip(named.items(), reached):
        if hit:
            q.finish_calibration()
        else:
            q._calibrator = None
            if not _optional(model, name):
                missing.append(name)
    if missing and unreached == "raise":
        raise RuntimeError(
            f"calibration never reached {len(missing)} quantizer(s): {missing}; the forward of their layers did "
            "not run on the calibration batches (a branch not taken, or a weight its parent uses directly). "
            "Exclude those layers, or let the QAT callback keep them in higher precision"
        )
    return n


def _batch_statistics(model: nn.Module, handles: list[Any]) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Switch every BatchNorm with running statistics to batch statistics (train mode); returns what to
    restore: each one's running statistics. A call with one value per channel (batch of 1 after a global
    pool), where batch statistics do not exist, uses the running ones (hooks appended to ``handles``)."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            names = [n for n in ("running_mean", "running_var", "num_batches_tracked") if getattr(m, n) is not None]
            out.append((m, {n: getattr(m, n).detach().clone() for n in names}))
            m.train()
            handles.append(m.register_forward_pre_hook(_one_value_per_channel_uses_running))
            handles.append(m.register_forward_hook(_back_to_batch_statistics))
    return out


def _one_value_per_channel_uses_running(m: nn.Module, args: tuple[Any, ...]) -> None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.numel() <= x.shape[1]:
        m.training = False


def _back_to_batch_statistics(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    m.training = True


def _optional(model: nn.Module, quantizer_name: str) -> bool:
    owner, _, leaf = quantizer_name.rpartition(".")
    layer = model.get_submodule(owner)
    return leaf in getattr(layer, "optional_quantizers", ())


def _reached_anywhere(flags: list[bool], qs: list[TensorQuantizer]) -> list[bool]:
    """Per quantizer, whether any DDP rank reached it (every rank must agree before reducing statistics)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not flags:
        return flags
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def unreached_layers(model: nn.Module) -> dict[str, list[str]]:
    """``{layer: [its INT8 quantizers left uncalibrated]}`` after :func:`calibrate` (optional ones excluded).

    Example:
        >>> from qatsparse.quantization import QuantConfig, quantize_model
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)); _ = quantize_model(m, QuantConfig())
        >>> _ = calibrate(m, [torch.randn(2, 4)], lambda b: m[0](b), unreached="keep"); unreached_layers(m)
        {'1': ['input_quantizer', 'weight_quantizer']}
    """
    out: dict[str, list[str]] = {}
    for name, layer in model.named_modules():
        if not is_quant_layer(layer):
            continue
        optional = set(getattr(layer, "optional_quantizers", ()))
        missing = [
            n
            for n, q in layer.named_children()
            if isinstance(q, TensorQuantizer) and q.precision == "int8" and not q.calibrated and n not in optional
        ]
        if missing:
            out[name] = missing
    return out


def _run(batches: Batches, forward: Callable[[Any], Any]) -> int:
    n = 0
    for batch in batches() if callable(batches) else batches:
        forward(batch)
        n += 1
    return n
