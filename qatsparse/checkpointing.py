"""Loading compressed checkpoints: restore a model's structure before its state_dict loads, in one call.

* :func:`load_from_checkpoint` -- ``qatsparse.load_from_checkpoint(MyModel, path)``: any LightningModule,
  no change to its class.
* :class:`CompressedCheckpointMixin` -- mixed into a LightningModule, Lightning's own
  ``MyModel.load_from_checkpoint(path)`` and ``trainer.validate/test/predict(model, ckpt_path=...)`` work.
* :func:`restore_structure` -- the step both use, for a module's own ``on_load_checkpoint``.

A quantization-aware checkpoint holds quantizer buffers (``*_quantizer.amax``) that a plain model lacks,
so a plain strict load cannot work; the QAT callback adds one entry to such a checkpoint's state_dict
whose key *is* the fix (:data:`HINT_PREFIX`), so PyTorch's ``Unexpected key(s) in state_dict`` error names
it. The loaders above drop that entry.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatsparse.sparsity.record import set_pruned_record

#: Top-level checkpoint key where the callbacks record what they changed in the model's structure.
CHECKPOINT_KEY = "qatsparse"

#: Start of the state_dict key that explains how to load a quantization-aware checkpoint.
HINT_PREFIX = "qatsparse: "


def load_hint(model_name: str) -> str:
    """The state_dict key added to a quantization-aware checkpoint of ``model_name`` (see the module docstring).

    Example:
        >>> load_hint("Net").startswith(HINT_PREFIX)
        True
    """
    return (
        f"{HINT_PREFIX}this checkpoint holds quantizers that {model_name} lacks until they are inserted -- load "
        f"it with qatsparse.load_from_checkpoint({model_name}, path), mix qatsparse.CompressedCheckpointMixin into "
        f"{model_name}, or resume training with the QuantizationAwareTraining callback in the Trainer"
    )


def add_load_hint(checkpoint: dict[str, Any], model_name: str) -> None:
    """Put the :func:`load_hint` entry first in ``checkpoint["state_dict"]`` (it is listed first in the error)."""
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):
        hinted: OrderedDict[str, Any] = OrderedDict([(load_hint(model_name), torch.zeros(0))])
        hinted.update(drop_load_hint(state))
        if getattr(state, "_metadata", None) is not None:  # per-module versions some layers check on load
            hinted._metadata = state._metadata  # type: ignore[attr-defined]
        checkpoint["state_dict"] = hinted


def drop_load_hint(state_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Remove the :func:`load_hint` entry (under ``prefix``, e.g. FSDP's wrapper prefix) from ``state_dict`` in
    place (and return it)."""
    for key in [k for k in state_dict if isinstance(k, str) and k.startswith(prefix + HINT_PREFIX)]:
        del state_dict[key]
    return state_dict


def restore_pruned_record(module: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Set the 2:4 record from a checkpoint written by :class:`~qatsparse.TwoFourSparsity`; True when it did.

    :func:`restore_structure` calls it, so ``LightningModule.load_from_checkpoint`` of a sparse checkpoint
    yields a module that ``check_2to4`` checks without further arguments.

    Example:
        >>> m = nn.Linear(16, 8); restore_pruned_record(m, {"qatsparse": {"sparsity": {"pruned_layers": [""]}}})
        True
    """
    state = (checkpoint.get(CHECKPOINT_KEY) or {}).get("sparsity")
    if not state:
        return False
    set_pruned_record(module, state["pruned_layers"])
    return True


def restore_structure(module: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Insert the quantizers a checkpoint's state_dict expects; returns True when it did.

    Call it from ``LightningModule.on_load_checkpoint`` (or use :class:`CompressedCheckpointMixin`) so that
    ``load_from_checkpoint`` of a QAT checkpoint gives the quantized model with its calibrated ``amax``.
    The recorded :class:`~qatsparse.quantization.QuantConfig` (with the layers kept in higher precision)
    determines the whole structure, residual quantizers included, so the strict load matches. Sparse
    checkpoints need nothing but the record of their 2:4 layers (for ``check_2to4``): the zeros are in the
    weights. (Resuming ``trainer.fit`` does not need this hook: the QAT callback restores the structure.)

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(4, 4))
        >>> restore_structure(m, {"qatsparse": {"quantization": {"precision": "int8"}}})
        True
    """
    from qatsparse.quantization import QuantConfig, is_quantized, quantize_model

    if isinstance(checkpoint.get("state_dict"), dict):
        drop_load_hint(checkpoint["state_dict"])
    restore_pruned_record(module, checkpoint)
    cfg = (checkpoint.get(CHECKPOINT_KEY) or {}).get("quantization")
    if not cfg or is_quantized(module):
        return False
    quantize_model(module, QuantConfig(**cfg))
    return True


def snapshot_state_dict(module: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A CPU copy of ``module.state_dict()`` that keeps its ``_metadata`` (the per-module versions some
    layers' ``_load_from_state_dict`` check, e.g. torchvision's MNASNet: without them loading fails with
    ``version should be set to 1 or 2``).

    Example:
        >>> snapshot_state_dict(nn.BatchNorm1d(2))._metadata[""]["version"]
        2
    """
    sd = module.state_dict()
    snap: OrderedDict[str, torch.Tensor] = OrderedDict((k, v.detach().cpu().clone()) for k, v in sd.items())
    snap._metadata = copy.deepcopy(getattr(sd, "_metadata", OrderedDict()))  # type: ignore[attr-defined]
    return snap


def with_metadata(state: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """``state`` with state-dict metadata: its own, else the metadata of ``module`` (same architecture) -- for
    snapshots taken before :func:`snapshot_state_dict` kept it.

    Example:
        >>> with_metadata({"weight": torch.ones(2)}, nn.BatchNorm1d(2))._metadata[""]["version"]
        2
    """
    if getattr(state, "_metadata", None) is not None:
        return state
    out: OrderedDict[str, Any] = OrderedDict(state)
    out._metadata = copy.deepcopy(getattr(module.state_dict(), "_metadata", OrderedDict()))  # type: ignore[attr-defined]
    return out


class CompressedCheckpointMixin:
    """Mix into a LightningModule (before ``LightningModule``) so that Lightning's own loading of pruned and
    quantization-aware checkpoints works: ``load_from_checkpoint``, ``trainer.validate/test/predict(model,
    ckpt_path=...)``. An ``on_load_checkpoint`` of your own must call ``super().on_load_checkpoint(checkpoint)``.

    Example:
        >>> import pytorch_lightning as pl
        >>> class Net(CompressedCheckpointMixin, pl.LightningModule): ...
        >>> net = Net.load_from_checkpoint("runs/x/model.ckpt")  # doctest: +SKIP
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_structure(self, checkpoint)  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint, or a plain state_dict wrapped as ``{"state_dict": ...}``.

    ``weights_only=False`` by default: Lightning checkpoints hold callback states (the user's own files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    if not isinstance(ckpt, dict):
        raise TypeError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint or state_dict")
    if "state_dict" not in ckpt:
        ckpt = {"state_dict": ckpt}
    return ckpt


def load_from_checkpoint(cls: type, path: str | Path, map_location: Any = None, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path, **kwargs)`` for any LightningModule class, also for pruned and
    quantization-aware checkpoints: the quantizers and the 2:4 record are restored, ``amax`` included.

    Args:
        cls: the LightningModule class (of either Lightning package).
        path: the checkpoint (e.g. ``dirpath/model.ckpt`` written by :class:`~qatsparse.TensorRTExport`).
        map_location: as in ``torch.load``.
        kwargs: override the saved hyperparameters, as in Lightning's ``load_from_checkpoint``.

    Example:
        >>> model = qatsparse.load_from_checkpoint(MyModel, "runs/x/model.ckpt")  # doctest: +SKIP
    """
    from qatsparse.lightning_compat import LIGHTNING_MODULES

    if not (isinstance(cls, type) and issubclass(cls, LIGHTNING_MODULES)):
        raise TypeError(
            f"load_from_checkpoint takes a LightningModule class, got {cls!r}; for a plain nn.Module call "
            "qatsparse.restore_structure(module, checkpoint) before module.load_state_dict(checkpoint['state_dict'])"
        )
    ckpt = read_checkpoint(path, map_location or "cpu")
    with warnings.catch_warnings():  # the quantizer buffers are "unexpected" until restore_structure below
        warnings.simplefilter("ignore")
        model = cls.load_from_checkpoint(path, map_location=map_location, strict=False, **kwargs)
    restore_structure(model, ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model
