"""Sharded parameters under Lightning's FSDP strategy: the full weights, and each rank's shard of a mask.

Lightning 2.6's ``strategy="fsdp"`` (:class:`~pytorch_lightning.strategies.FSDPStrategy`) wraps the
LightningModule in PyTorch's ``FullyShardedDataParallel`` (FSDP1) with ``use_orig_params=True``: outside
the forward and backward every rank holds only a flat 1-D slice of each weight, and
``pl_module.named_parameters()`` shows those slices (a weight another rank holds entirely is empty
here). qatsparse works on the full weights where it needs their shape or values -- computing 2:4
masks, inserting and calibrating quantizers, the preflight forward, the export -- by entering
:func:`full_weights` on every rank (``FullyShardedDataParallel.summon_full_params``, a collective), and
keeps each rank's shard 2:4 after every optimizer step with the part of each mask that the rank holds
(:func:`local_masks`). Inner FSDP units (``auto_wrap_policy``) and activation-checkpoint wrappers rename the
modules (``layer1._fsdp_wrapped_module.conv1``); inside :func:`full_weights` (and :func:`module_names`) the
module tree is :func:`unwrapped`, so masks, quantizers and reports use the names the user wrote, and the
export copies a model without wrappers. Without FSDP all of these are no-ops, so the callbacks call them
unconditionally.

Supported: ``FSDPStrategy`` with or without ``auto_wrap_policy`` and ``activation_checkpointing_policy``, any
``sharding_strategy``, ``state_dict_type="full"`` (``"sharded"`` for 2:4 without QAT or export).
:func:`check_strategy` names what is not, before step 0 (docs/distributed.md).

Example:
    >>> import torch
    >>> from torch import nn
    >>> m = nn.Linear(8, 4)
    >>> with full_weights(None):  # no FSDP: the module as it is
    ...     tuple(m.weight.shape)
    (4, 8)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from torch import nn

#: The state_dict prefix of the module inside FSDP's wrapper (``torch.distributed.fsdp`` names it so).
FSDP_PREFIX = "_fsdp_wrapped_module."


def fsdp_root(trainer: Any) -> nn.Module | None:
    """The ``FullyShardedDataParallel`` root that wraps the Trainer's LightningModule, or None (no FSDP)."""
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, FSDPStrategy):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = getattr(strategy, "model", None)
    return model if isinstance(model, FSDP) else None


def is_sharded(trainer: Any) -> bool:
    """Whether the Trainer's model is wrapped by FSDP (its parameters are shards outside forward/backward)."""
    return fsdp_root(trainer) is not None


#: Wrapper modules that FSDPStrategy puts inside the LightningModule, and the attribute holding the wrapped module:
#: inner FSDP units (``auto_wrap_policy``) and activation checkpointing/offloading.
WRAPPERS = {
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
    "CheckpointWrapper": "_checkpoint_wrapped_module",
    "OffloadWrapper": "_checkpoint_wrapped_module",
}


def _inner(module: nn.Module) -> nn.Module | None:
    attr = WRAPPERS.get(type(module).__name__)
    return getattr(module, attr, None) if attr else None


def clean_name(name: str) -> str:
    """``name`` without the wrapper segments FSDP and activation checkpointing insert.

    Example:
        >>> clean_name("layer1._fsdp_wrapped_module._checkpoint_wrapped_module.conv1.weight")
        'layer1.conv1.weight'
    """
    for attr in set(WRAPPERS.values()):
        name = name.replace(f"{attr}.", "").removesuffix(f".{attr}")
    return name


@contextlib.contextmanager
def unwrapped(module: nn.Module | None) -> Iterator[None]:
    """Inside, ``module``'s tree holds the modules the user wrote: every inner FSDP unit and activation-checkpoint
    wrapper is replaced by the module it wraps (and put back on exit), so module names, quantizer names and
    forwards are those of the unwrapped model. Parameters are not touched (inner FSDP units' weights are shards
    unless :func:`full_weights` gathered them). Local: no communication."""
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    stack = [module] if module is not None else []
    while stack:
        parent = stack.pop()
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            inner = child
            while (nxt := _inner(inner)) is not None:
                inner = nxt
            if inner is not child:
                parent._modules[name] = inner
                swaps.append((parent, name, child))
            stack.append(inner)
    try:
        yield
    finally:
        for parent, name, child in reversed(swaps):
            parent._modules[name] = child


def module_names(trainer: Any) -> contextlib.AbstractContextManager:
    """:func:`unwrapped` for the Trainer's LightningModule under FSDP (names as the user wrote them), else nothing."""
    return unwrapped(trainer.lightning_module) if is_sharded(trainer) else contextlib.nullcontext()


@contextlib.contextmanager
def full_weights(trainer: Any, writeback: bool = False, rank0_only: bool = False) -> Iterator[None]:
    """Inside, the LightningModule's parameters are the full (unsharded) weights on every rank (only on rank 0
    with ``rank0_only``, offloaded to the CPU there) and its tree is :func:`unwrapped` (names and forwards as the
    user wrote them). Changes are written back to the shards with ``writeback=True``. Every rank must enter it
    (FSDP gathers the shards). Re-entrant: inside, a nested call changes nothing. Without FSDP, does nothing."""
    root = fsdp_root(trainer)
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if getattr(root, "_qatsparse_full", False):  # already inside: FSDP does not nest summon_full_params
        yield
        return
    with (
        FSDP.summon_full_params(
            root, writeback=writeback, rank0_only=rank0_only, offload_to_cpu=rank0_only, recurse=True
        ),
        unwrapped(trainer.lightning_module),
        _buffers_like_parameters(trainer.lightning_module),
    ):
        root._qatsparse_full = True
        try:
            yield
        finally:
            root._qatsparse_full = False


@contextlib.contextmanager
def _buffers_like_parameters(module: nn.Module) -> Iterator[None]:
    """Floating buffers in the dtype of the full parameters while inside, put back after.

    FSDP mixed precision (``precision="16-mixed"`` without an inner unit for BatchNorm) keeps buffers in FP16 but
    gives the full FP32 weights inside ``summon_full_params``: a forward there (preflight, calibration, export)
    would fail on ``running_mean`` being half while ``weight`` is float. FSDP's own forward casts both."""
    params = [p for p in module.parameters() if p.is_floating_point() and p.numel()]
    if not params:
        yield
        return
    dtype = params[0].dtype
    changed = []
    for m in module.modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                changed.append((m, name, b.dtype))
                setattr(m, name, b.to(dtype))
    try:
        yield
    finally:
        for m, name, was in changed:
            setattr(m, name, getattr(m, name).to(was))


@torch.no_grad()
def local_masks(trainer: Any, weights: list[nn.Parameter], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """``masks`` (full shape, one per weight of ``weights``) cut to the part of each weight this rank holds.

    Under FSDP each full mask is written into its weight with the full weights gathered, FSDP scatters
    them to the shards, each rank reads its part, and the weights are put back: only FSDP's public API
    (``summon_full_params(writeback=True)``), whatever layout its flat parameters use. Every rank must
    call it. Without FSDP the masks are returned as they are.
    """
    if not is_sharded(trainer):
        return masks
    with full_weights(trainer, writeback=True):
        kept = [w.detach().clone() for w in weights]
        for w, m in zip(weights, masks):
            if tuple(m.shape) != tuple(w.shape):
                raise ValueError(f"a mask of shape {tuple(m.shape)} for a weight of shape {tuple(w.shape)}")
            w.copy_(m.to(device=w.device, dtype=w.dtype))
    parts = [w.detach().clone() for w in weights]  # this rank's shard of each mask (0/1, exact in any dtype)
    with full_weights(trainer, writeback=True):
        for w, k in zip(weights, kept):
            w.copy_(k)
    return parts


def check_strategy(trainer: Any, pl_module: nn.Module) -> None:
    """The Trainer's strategy is one qatsparse supports; else a ValueError naming the setting and the fix."""
    strategy = getattr(trainer, "strategy", None)
    name = type(strategy).__name__
    if name == "ModelParallelStrategy":
        raise ValueError(
            "ModelParallelStrategy (FSDP2 fully_shard / tensor parallel in configure_model) is not supported by "
            "qatsparse: use strategy='fsdp' (FSDPStrategy: FullyShardedDataParallel over the whole LightningModule) "
            "or strategy='ddp' (docs/distributed.md)"
        )
    if not isinstance(strategy, FSDPStrategy):
        return
    if not strategy.kwargs.get("use_orig_params", True):
        raise ValueError(
            "FSDPStrategy(use_orig_params=False): qatsparse needs the original parameters (masks and quantizers "
            "are attached per layer): leave use_orig_params=True, Lightning's default"
        )


def contiguous_parameters(trainer: Any, pl_module: nn.Module) -> list[str]:
    """Under FSDP, before it wraps the module: make every non-contiguous parameter (``channels_last`` conv
    weights) contiguous; returns their names (empty without FSDP or when all are contiguous).

    PyTorch's FSDP1 flattens such a parameter in storage order (``as_strided((numel,), (1,))``) but loads a
    full optimizer state dict with ``torch.flatten`` (logical order), so a resumed run gets the momentum of
    every ``channels_last`` 3x3 conv scrambled while its weights load right (measured on 2 H200s:
    benchmarks/results/fsdp_resume_diagnosis_2xh200.json; NVIDIA/physicsnemo#1597 describes the same asymmetry).
    Nothing in PyTorch or Lightning repairs it, so qatsparse avoids it at the source: contiguous parameters
    flatten the same way both times. Inputs are not touched (they may stay ``channels_last``).
    Called from the callbacks' ``setup`` hook, which Lightning runs before the strategy wraps the model.

    Example:
        >>> contiguous_parameters(None, nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last))  # no FSDP
        []
    """
    if not isinstance(getattr(trainer, "strategy", None), FSDPStrategy):
        return []
    changed = []
    for name, p in pl_module.named_parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
            changed.append(name)
    return changed


def ddp_gradient_layout(trainer: Any, pl_module: nn.Module) -> list[str]:
    """Under DDP, before it wraps the module: give every parameter that is contiguous but carries other
    strides in its size-1 dimensions (``channels_last`` 1x1 conv weights ``(O, C, 1, 1)``) the strides of a
    contiguous tensor -- a view of the same bytes, nothing moves; returns their names.

    ATen's kernels, the per-channel fake quantization's backward among them, write such a weight's gradient
    with contiguous strides in the size-1 dimensions, and DDP compares a gradient's strides with its bucket
    view's (laid out like the parameter) exactly: it warned "Grad strides do not match bucket view strides"
    once per rank. On one H200 (benchmarks/results/ddp_strides_1gpu_h200.json) that mismatch cost nothing
    measurable, while the Python ``autograd.Function`` that used to write the gradient in the weight's own
    layout made the eager DDP step about 10 % slower; so the parameter's layout is fixed instead, once.

    Example:
        >>> conv = nn.Conv2d(3, 8, 1).to(memory_format=torch.channels_last); conv.weight.stride()
        (3, 1, 3, 3)
        >>> ddp_gradient_layout(None, conv), conv.weight.stride()  # without DDP: left alone
        ([], (3, 1, 3, 3))
    """
    if not isinstance(getattr(trainer, "strategy", None), DDPStrategy):
        return []
    return contiguous_size1_strides(pl_module)


def contiguous_size1_strides(module: nn.Module) -> list[str]:
    """The layout change of :func:`ddp_gradient_layout`, whatever the strategy; returns the names changed.

    Example:
        >>> conv = nn.Conv2d(3, 8, 1).to(memory_format=torch.channels_last)
        >>> contiguous_size1_strides(conv), conv.weight.stride()
        (['weight'], (3, 1, 1, 1))
    """
    changed = []
    for name, p in module.named_parameters():
        want = torch.empty(p.shape, device="meta").stride()  # a contiguous tensor's strides, nothing allocated
        if p.is_contiguous() and p.stride() != want:
            p.data = p.data.as_strided(p.shape, want)
            changed.append(name)
    return changed


def summed_over_ranks(trainer: Any, counts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Integer counts per key (the same keys on every rank) summed over all ranks; as given without FSDP.
    Every rank must call it (one all-reduce).

    Example:
        >>> summed_over_ranks(None, {"conv": [3, 8]})
        {'conv': [3, 8]}
    """
    if not is_sharded(trainer) or not counts:
        return counts
    keys = sorted(counts)
    device = next(trainer.lightning_module.parameters()).device
    t = torch.tensor([counts[k] for k in keys], dtype=torch.int64, device=device)
    t = trainer.strategy.reduce(t, reduce_op="sum")
    return {k: [int(v) for v in row] for k, row in zip(keys, t.cpu().tolist())}


def check_unsharded(trainer: Any, what: str, fix: str) -> None:
    """``what`` rewrites weights, BatchNorm statistics and optimizer state in place: not under FSDP, which holds
    them in shards (a ValueError naming ``fix``)."""
    if isinstance(getattr(trainer, "strategy", None), FSDPStrategy):
        raise ValueError(
            f"{what} with FSDPStrategy: it reorders weights, BatchNorm statistics and optimizer state in place, "
            f"which FSDP holds in shards; {fix}"
        )


def check_full_state_dict(trainer: Any, owner: str) -> None:
    """``owner`` (``"TensorRTExport"`` or ``"QuantizationAwareTraining"``) needs FSDP to save full state dicts:
    the export writes ``dirpath/model.ckpt`` as one file that a single process exports from, and the quantizers
    of a resumed QAT run are rebuilt while a full state dict loads (a sharded load only fills the keys that
    exist before it)."""
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") != "full":
        why = (
            "the export saves the trained model as one file (dirpath/model.ckpt) that a single process exports from"
            if owner == "TensorRTExport" else
            "a sharded checkpoint cannot restore the quantizers' calibrated amax on resume"
        )  # fmt: skip
        raise ValueError(
            f"{owner} with FSDPStrategy(state_dict_type='sharded'): {why}; use FSDPStrategy(state_dict_type='full')"
        )


class CPUFSDPStrategy(FSDPStrategy):
    """:class:`~pytorch_lightning.strategies.FSDPStrategy` on CPU processes (gloo), for tests and smoke runs.

    Lightning 2.6 refuses ``strategy="fsdp"`` with ``accelerator="cpu"`` (an exact type check on
    ``FSDPStrategy``) and passes ``device_id=None``, which PyTorch's FSDP refuses on a machine without an
    accelerator ("FSDP needs a non-CPU accelerator device"). This subclass wraps the model with ``device_id=cpu``
    and the strategy's other settings, then hands it to Lightning's own setup (activation checkpointing and the
    rest); sharding, gathering and checkpoints are Lightning's and PyTorch's own code.

    Example:
        >>> trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=CPUFSDPStrategy())  # doctest: +SKIP
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied here; Lightning would warn that it is ignored
        return super()._setup_model(model)  # an FSDP model: Lightning's activation checkpointing and the rest


__all__ = [
    "FSDP_PREFIX",
    "WRAPPERS",
    "CPUFSDPStrategy",
    "check_full_state_dict",
    "check_strategy",
    "check_unsharded",
    "clean_name",
    "contiguous_parameters",
    "fsdp_root",
    "full_weights",
    "is_sharded",
    "local_masks",
    "module_names",
    "summed_over_ranks",
    "unwrapped",
]
