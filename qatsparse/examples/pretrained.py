"""Start from a trained model: load ``init_ckpt`` (a Lightning checkpoint or a plain state_dict).

The example models take ``init_ckpt`` and call :func:`setup_init_ckpt` from ``on_fit_start`` (and the
validate/test/predict start hooks), so the weights are loaded once, when a Trainer first uses the model,
and *not* when the Trainer restores a checkpoint of its own (``fit(ckpt_path=...)`` resuming,
``validate(ckpt_path=...)``, ``qatsparse export --ckpt_path``): a resumed run is never silently reset to
the starting weights, and a checkpoint stays loadable after the init file has moved. A user's own
LightningModule does the same with a few lines (docs/recipes.md, "Starting from a trained model").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Prefixes commonly wrapped around a state_dict's keys (Lightning modules, DDP, wrapper modules).
_PREFIXES = ("model.", "module.", "net.", "_orig_mod.")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state_dict in ``path`` and the whole file (a Lightning checkpoint keeps it under ``state_dict``).

    Example:
        >>> import tempfile; p = tempfile.mkdtemp() + "/w.pt"; torch.save(nn.Linear(2, 1).state_dict(), p)
        >>> sorted(read_state_dict(p)[0])
        ['bias', 'weight']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_ckpt {str(path)!r} does not exist")
    # weights_only=False: a Lightning checkpoint also holds optimizer and callback states (the user's file).
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"init_ckpt {str(path)!r} holds a {type(obj).__name__}, not a checkpoint or a state_dict")
    state = obj.get("state_dict", obj)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return state, dict(obj)


def match_keys(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Rename ``state``'s keys by removing or adding one common prefix (``model.``, ``net.``, ...) when
    that makes more of them match ``expected`` (e.g. a torchvision state_dict into a wrapper module).

    Example:
        >>> sorted(match_keys({"model.w": torch.zeros(1)}, {"w"}))
        ['w']
    """
    candidates = [dict(state)]
    for p in _PREFIXES:
        candidates.append({k[len(p) :] if k.startswith(p) else k: v for k, v in state.items()})
        candidates.append({p + k: v for k, v in state.items()})
    return max(candidates, key=lambda c: len(expected.intersection(c)))


def load_init_ckpt(module: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load the weights of ``path`` into ``module`` as the starting point of training.

    Args:
        module: the model.
        path: a Lightning checkpoint or a plain ``state_dict`` (``torch.save(model.state_dict(), path)``).
        strict: every key of the module must be found and every tensor must fit.

    Raises:
        ValueError: the file holds a quantization-aware-trained model (resume it with ``ckpt_path``
            instead), or (``strict``) keys are missing or unexpected.

    Example:
        >>> import tempfile; p = tempfile.mkdtemp() + "/w.pt"; src = nn.Linear(2, 1)
        >>> torch.save({"state_dict": src.state_dict()}, p); dst = nn.Linear(2, 1); load_init_ckpt(dst, p)
        >>> bool(torch.equal(dst.weight, src.weight))
        True
    """
    state, whole = read_state_dict(path)
    if (whole.get("qatsparse") or {}).get("quantization") or any(k.endswith("_quantizer.amax") for k in state):
        raise ValueError(
            f"init_ckpt {str(path)!r} holds a quantization-aware-trained model; init_ckpt takes dense or "
            "2:4-pruned weights. Resume that run with `ckpt_path` or export it with `qatsparse export --ckpt_path`."
        )
    own = module.state_dict()
    state = match_keys(state, set(own))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if strict and (missing or unexpected or shape):
        parts = [
            f"{what} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape))
            if keys
        ]
        raise ValueError(f"init_ckpt {str(path)!r} does not fit {type(module).__name__}: " + "; ".join(parts))
    from qatsparse.checkpointing import with_metadata

    # the filtered dict has no state-dict metadata: take the module's (some layers check their version)
    module.load_state_dict(with_metadata({k: v for k, v in state.items() if k not in shape}, module), strict=False)


def setup_init_ckpt(module: Any, path: str | Path | None) -> bool:
    """Call from ``on_fit_start`` (and ``on_validation_start``/``on_test_start``/``on_predict_start``): load
    ``path`` once, unless a checkpoint was restored into the module (:func:`mark_restored`). Returns True
    when it loaded.

    These hooks run after Lightning restores ``ckpt_path`` (``setup`` runs before, when the Trainer does not
    yet know the path), and after the optimizers exist: loading copies into the same parameters.

    Example:
        >>> setup_init_ckpt(nn.Linear(2, 1), None)
        False
    """
    if not path or getattr(module, "_qatsparse_init_loaded", False) or getattr(module, "_qatsparse_restored", False):
        return False
    load_init_ckpt(module, path)
    module._qatsparse_init_loaded = True
    return True


def mark_restored(module: Any) -> None:
    """Call from ``on_load_checkpoint``: the module now holds a checkpoint's weights, so ``init_ckpt`` is skipped."""
    module._qatsparse_restored = True
