"""ONNX export: FP32 and Q/DQ graphs with a dynamic batch axis, written atomically, checked."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatsparse.export.atomic import atomic_path
from qatsparse.export.folding import fold_constants
from qatsparse.export.graph import module_name_of_node
from qatsparse.export.metadata import (
    ABSENT_METADATA_KEY,
    get_metadata,
    nodes_of_modules,
    record_pruned_layers,
    set_metadata,
    weighted_node_names,
)

__all__ = [
    "ABSENT_METADATA_KEY",
    "DEFAULT_OPSET",
    "FP16_QDQ_OPSET",
    "LEGACY_EXPORTER_MODULE",
    "LEGACY_EXPORTER_NOTICE",
    "atomic_path",
    "default_input_names",
    "default_io_names",
    "export_onnx",
    "fold_constants",
    "get_metadata",
    "module_name_of_node",
    "nodes_of_modules",
    "record_pruned_layers",
    "save_model",
    "set_metadata",
    "weighted_node_names",
]

DEFAULT_OPSET = 17
#: The notice ``torch.onnx.export(dynamo=False)`` emits since PyTorch 2.9 (a regex for ``filterwarnings``).
LEGACY_EXPORTER_NOTICE = r"You are using the legacy TorchScript-based ONNX export"
#: Where the TorchScript exporter calls its own deprecated helpers (``setup_onnx_logging``): a DeprecationWarning
#: attributed to this module is torch's, not the user's.
LEGACY_EXPORTER_MODULE = r"torch\.onnx\._internal\.torchscript_exporter"
#: Opset at which QuantizeLinear/DequantizeLinear take FP16 inputs and scales (used for INT8 + FP16 graphs).
FP16_QDQ_OPSET = 19


def default_io_names(n: int, stem: str) -> list[str]:
    """``["input"]`` for one tensor, ``["input_0", "input_1", ...]`` for several.

    Example:
        >>> default_io_names(2, "output")
        ['output_0', 'output_1']
    """
    return [stem] if n == 1 else [f"{stem}_{i}" for i in range(n)]


def _output_names_of(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, list[str] | None]:
    """Number of outputs, and their names when the model returns a dict (its keys)."""
    from qatsparse.batches import as_outputs

    with torch.no_grad():
        y = model(*inputs)  # keyword inputs: `model` was made positional by _positional_forward
    names = [str(k) for k in y] if isinstance(y, Mapping) else None
    return len(as_outputs(y)), names


def _positional_forward(model: nn.Module, names: Sequence[str]) -> None:
    """Make ``model`` (a private copy) take its keyword inputs ``names`` positionally, in that order.

    The TorchScript exporter traces positional tensors; its own trailing-dict convention reorders the
    keywords by ``forward``'s signature and cannot serve ``forward(**inputs)``. An instance attribute
    (not a wrapper module) keeps the node scope names, which map ONNX nodes back to module names.
    """
    keyword_forward = model.forward

    def forward(*tensors: torch.Tensor) -> Any:
        return keyword_forward(**dict(zip(names, tensors)))

    model.forward = forward  # type: ignore[method-assign]


def default_input_names(module: Any, n: int) -> list[str]:
    """Input names: the keys of a dict ``example_input_array`` when the module has one, else numbered.

    Example:
        >>> default_input_names(None, 2)
        ['input_0', 'input_1']
    """
    ex = getattr(module, "example_input_array", None)
    if isinstance(ex, Mapping) and len(ex) == n:
        return [str(k) for k in ex]
    return default_io_names(n, "input")


def save_model(proto: Any, path: str | Path) -> Path:
    """Check ``proto`` (checker + strict shape inference) and write it atomically to ``path``."""
    import onnx

    path = Path(path)
    onnx.checker.check_model(proto, full_check=True)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def export_onnx(
    model: nn.Module,
    inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    path: str | Path,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: Mapping[str, str] | None = None,
    fold: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    copy_model: bool = True,
) -> Path:
    """Export ``model`` to ONNX at ``path`` (atomically) and check the result.

    Uses the TorchScript exporter (``dynamo=False``): the torch.export-based exporter cannot export
    fake-quantized models with a dynamic batch axis in PyTorch 2.14, and its default graph optimization
    changes the numbers of some Q/DQ graphs (``benchmarks/exporter_trial.py``; docs/design.md). Only the
    TorchScript exporter's own deprecation notices are silenced. The model is exported on the CPU in eval mode
    from a copy, so the caller's model is not touched; ``nn.MultiheadAttention`` is exported through
    :func:`qatsparse.attention.attention_forward` (PyTorch's own export fixes the sequence length into its
    reshapes) with PyTorch's attention fast paths off. Every input and output gets a dynamic batch axis
    (``"batch"``) unless ``dynamic_batch`` is False; ``dynamic_axes`` ``{input name: {axis: dim name}}`` adds
    more (see :mod:`qatsparse.export.shapes`). Output names default to the keys of a dict output, else
    ``output``/``output_i``. Keyword inputs (a dict, called as ``model(**inputs)``) become graph inputs named
    after their keywords, in the dict's order.
    With ``fold`` the constant subgraphs the exporter leaves (Q/DQ scales computed from
    buffers, quantization of constant weights) are folded (see :func:`fold_constants`), so every
    Q/DQ scale is a constant as TensorRT requires, and an INT8 weight used in parts gets one INT8
    initializer per part (:func:`qatsparse.export.rewrites.slice_dequantized_weights`). ``onnx.checker``
    and shape inference must pass. ``copy_model=False`` exports ``model`` itself (moved to the CPU, eval
    mode, plain attention): for a copy made only for this export, one copy of the weights fewer in memory.

    Example:
        >>> import tempfile
        >>> p = export_onnx(nn.Linear(4, 2), [torch.zeros(1, 4)], tempfile.mkdtemp() + "/m.onnx")
        >>> p.name
        'm.onnx'
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (per-channel Q/DQ and TensorRT 10/11), got {opset}")
    from qatsparse.attention import explicit_attention, fast_paths_off

    path = Path(path)
    model = (copy.deepcopy(model) if copy_model else model).cpu().eval()
    explicit_attention(model)  # plain ops with symbolic shapes instead of PyTorch's fused attention
    if isinstance(inputs, Mapping):
        keywords = [str(k) for k in inputs]
        _positional_forward(model, keywords)
        input_names = list(input_names) if input_names else keywords
        inputs = tuple(inputs.values())
    inputs = tuple(t.detach().cpu() for t in inputs)
    with fast_paths_off():
        names = (input_names, output_names)
        return _export(model, inputs, path, *names, opset, dynamic_batch, metadata, fold, dynamic_axes)


def _export(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    opset: int,
    dynamic_batch: bool,
    metadata: Mapping[str, str] | None,
    fold: bool,
    extra_axes: Mapping[str, Mapping[int, str]] | None,
) -> Path:
    import onnx

    from qatsparse.export.rewrites import slice_dequantized_weights
    from qatsparse.export.shapes import onnx_dynamic_axes

    n_out, dict_names = _output_names_of(model, inputs)
    input_names = list(input_names) if input_names else default_io_names(len(inputs), "input")
    output_names = list(output_names) if output_names else (dict_names or default_io_names(n_out, "output"))
    if len(input_names) != len(inputs):
        raise ValueError(f"{len(input_names)} input names for {len(inputs)} inputs: {input_names}")
    if len(output_names) != n_out:
        raise ValueError(f"{len(output_names)} output names for {n_out} outputs: {output_names}")
    if len(set(input_names) | set(output_names)) != len(input_names) + len(output_names):
        raise ValueError(f"input and output names must be unique, got {input_names} and {output_names}")
    dynamic_axes = {
        **onnx_dynamic_axes(input_names, extra_axes or {}, dynamic_batch),
        **({n: {0: "batch"} for n in output_names} if dynamic_batch else {}),
    }
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # Only the exporter's own deprecation notices are silenced (docs/design.md says why this exporter);
        # tracer warnings, which signal a trace that may not generalise, reach the user.
        warnings.filterwarnings("ignore", message=LEGACY_EXPORTER_NOTICE, category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=LEGACY_EXPORTER_MODULE)
        torch.onnx.export(
            model,
            inputs,
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes or None,
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        if fold:
            fold_constants(proto, in_place=True)
            slice_dequantized_weights(proto)
        for k, v in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(tmp))
        del proto  # checked and shape-inferred from the file: no more copies of the weights in Python
        onnx.checker.check_model(str(tmp), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(tmp), str(tmp), check_type=True, strict_mode=True)
    return path
